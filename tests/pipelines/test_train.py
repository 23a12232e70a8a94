"""The diffusion adapter-training loop on a micro SD pipeline (CPU)."""

from __future__ import annotations

import pytest
import torch
from micro_sd import ColourDataset, micro_pipeline

from peft_core import LoraConfig, PacaConfig, load
from pipelines.checkpoint import latest_checkpoint
from pipelines.errors import UserError
from pipelines.train import UNET_ATTENTION_TARGETS, TrainConfig, train_adapter


def adapter_tensors(handle, name="default"):
    return {k: v.detach().clone() for k, v in handle.state_dict(name).items()}


@pytest.mark.parametrize(
    "config", [LoraConfig(targets=UNET_ATTENTION_TARGETS, r=4), PacaConfig(targets=UNET_ATTENTION_TARGETS, r=4)]
)
def test_training_lowers_loss_and_writes_a_reloadable_adapter(tmp_path, config):
    pipe = micro_pipeline(tmp_path / "tok")
    events = []
    train = TrainConfig(
        steps=12, batch_size=2, learning_rate=5e-3, checkpoint_every=5, sample_prompts=["red"], sample_steps=2
    )
    handle = train_adapter(pipe, ColourDataset(), config, train, tmp_path / "run", on_event=events.append)
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, 13))
    assert all(e.loss is not None and e.loss == e.loss for e in steps)
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] and latest_checkpoint(
        tmp_path / "run"
    ).name == "step-00000012"
    assert events[-1].kind == "done"
    trained = adapter_tensors(handle)
    assert any(v.is_floating_point() and v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k or "delta" in k)

    fresh = micro_pipeline(tmp_path / "tok2")
    load(fresh.unet, tmp_path / "run" / "adapter" / "default")
    latents = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 16, 16)
    torch.testing.assert_close(fresh.unet(latents, 10, text).sample, pipe.unet(latents, 10, text).sample)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    config = LoraConfig(targets=UNET_ATTENTION_TARGETS, r=4, dropout=0.1)
    train = TrainConfig(
        steps=8, batch_size=2, learning_rate=5e-3, checkpoint_every=3, weight_decay=0.01, lr_schedule="cosine"
    )

    straight = train_adapter(micro_pipeline(tmp_path / "a"), ColourDataset(), config, train, tmp_path / "straight")
    expected = adapter_tensors(straight)

    class Interrupt(Exception):
        pass

    def stop_at_five(event):
        if event.kind == "step" and event.step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_adapter(
            micro_pipeline(tmp_path / "b"), ColourDataset(), config, train, tmp_path / "resumed", on_event=stop_at_five
        )
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000003"
    resumed = train_adapter(micro_pipeline(tmp_path / "c"), ColourDataset(), config, train, tmp_path / "resumed")
    for key, value in adapter_tensors(resumed).items():
        assert torch.equal(value, expected[key]), key


def test_bad_train_config_is_a_clear_error(tmp_path):
    pipe = micro_pipeline(tmp_path / "tok")
    with pytest.raises(UserError, match="optimizer='adam9' is not one of adamw, adamw8bit"):
        train_adapter(
            pipe,
            ColourDataset(),
            LoraConfig(targets=UNET_ATTENTION_TARGETS),
            TrainConfig(optimizer="adam9"),
            tmp_path / "r",
        )
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        train_adapter(
            pipe,
            ColourDataset(),
            LoraConfig(targets=UNET_ATTENTION_TARGETS),
            TrainConfig(optimizer="adamw8bit"),
            tmp_path / "r",
        )


def test_runs_with_different_mixed_precision_in_one_process(tmp_path):
    """accelerate refuses a second precision in one process; a notebook or a benchmark trains many runs."""
    from pipelines.train import make_accelerator

    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"
    pipe = micro_pipeline(tmp_path / "tok")
    handle = train_adapter(
        pipe,
        ColourDataset(4),
        LoraConfig(targets=["to_q"], r=2),
        TrainConfig(steps=1, batch_size=2, checkpoint_every=10**9),
        tmp_path / "run",
    )
    assert handle.adapter_names == ["default"]
