"""load_base / load_embedded_lm: the embedded models load offline; bad specs fail with one clear line."""

from __future__ import annotations

import socket

import pytest

from pipelines import load_base, load_embedded_lm
from pipelines.base import EMBEDDED_SD, embedded_lm_data
from pipelines.errors import UserError


@pytest.fixture
def no_network(monkeypatch):
    """Make any connection attempt fail loudly, on top of HF_HUB_OFFLINE=1."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_embedded_sd_loads_offline_as_a_stable_diffusion_pipeline(no_network):
    from diffusers import StableDiffusionPipeline

    pipeline = load_base("embedded")
    assert isinstance(pipeline, StableDiffusionPipeline)
    assert pipeline.safety_checker is None
    assert type(pipeline.text_encoder).__name__ == "CLIPTextModel"
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == 64
    # The default and the long name are the same model.
    assert type(load_base()).__name__ == type(load_base("embedded-tiny-sd")).__name__


def test_a_local_diffusers_folder_loads(no_network):
    pipeline = load_base(str(EMBEDDED_SD))
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size


def test_weights_stay_small():
    total = sum(f.stat().st_size for f in EMBEDDED_SD.rglob("*.safetensors"))
    assert total < 50e6


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/no/such/folder", "not found"),
        ("./missing-model", "not found"),
        ("model.safetensors", "not found"),
        ("not a hub id", "not found"),
    ],
)
def test_missing_paths_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        load_base(spec)


def test_folder_without_model_index_is_rejected(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        load_base(tmp_path)


def test_unreachable_hub_id_is_a_user_error_offline(no_network):
    with pytest.raises(UserError, match="hub"):
        load_base("nobody-here/no-such-model-xyz")


def test_embedded_lm_loads_offline_with_its_data(no_network):
    model, tokenizer = load_embedded_lm()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.chat_template is not None
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert embedded_lm_data("task_add_train.jsonl").is_file()
    with pytest.raises(UserError, match="available"):
        embedded_lm_data("nope.jsonl")


def test_missing_lm_path_is_a_user_error():
    with pytest.raises(UserError, match="not found"):
        load_embedded_lm("./no-such-lm")


def test_broken_single_file_checkpoint_is_a_user_error(tmp_path, no_network):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="single-file checkpoint"):
        load_base(checkpoint)
