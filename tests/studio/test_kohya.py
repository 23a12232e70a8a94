"""kohya/ComfyUI LoRA files: the studio's export loads in diffusers' kohya path to the same image with every
key consumed; a file in a third party's layout stacks at generation, and starts a training run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from peft_core.io import read_safetensors
from studio.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from micro_families import micro_sdxl  # noqa: E402
from micro_sd import micro_pipeline  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "assets"
DATA = ASSETS / "sets" / "content-moon"
FAST = ["--resolution", "16", "--steps", "2", "--batch-size", "2", "--sample-steps", "2", "--checkpoint-every", "2"]
DRAW = ["--prompt", "a moon", "--size", "16", "--steps", "3", "--guidance", "2.0"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya-bases")
    micro_pipeline(root / "sd-parts").save_pretrained(root / "sd", safe_serialization=True)
    micro_sdxl(root / "sdxl")
    return root


def _run(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if (p / "run.json").is_file()]
    return run


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _diffusers_image(base: Path, lora: Path | None, merge: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """diffusers' own image: with `lora` loaded by load_lora_weights, or with a kohya state dict `merge`d
    into the weights by hand (W += alpha / r * up @ down), the reference that needs no LoRA loader."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))  # diffusers' kohya conversion raises on any key it leaves unused
    if merge is not None:
        names = {
            prefix + name.replace(".", "_"): module
            for prefix, model in (("lora_unet_", pipe.unet), ("lora_te_", pipe.text_encoder))
            for name, module in model.named_modules()
        }
        with torch.no_grad():
            for key in [k for k in merge if k.endswith(".lora_down.weight")]:
                stem = key[: -len(".lora_down.weight")]
                down, up, alpha = merge[key], merge[f"{stem}.lora_up.weight"], merge[f"{stem}.alpha"]
                names[stem].weight += (alpha / down.shape[0]) * up @ down
    image = pipe(
        "a moon", num_inference_steps=3, guidance_scale=2.0, height=16, width=16,
        generator=[torch.Generator("cpu").manual_seed(0)],
    ).images[0]  # fmt: skip
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_export_loads_in_diffusers_to_the_studio_image(bases, tmp_path, family):
    base = bases / family
    train = ["train-content", str(DATA), "--base", str(base), "--rank", "2", *FAST, "--runs-dir", str(tmp_path)]
    assert main(train) == 0
    run = _run(tmp_path)
    lora = tmp_path / "moon.safetensors"
    assert main(["export", str(run), "--base", str(base), "--format", "kohya", "--out", str(lora)]) == 0

    with safe_open(str(lora), framework="pt") as file:
        keys, header = list(file.keys()), file.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in keys} == {
        "lora_down",
        "lora_up",
        "alpha",
    }
    assert header["ss_network_module"] == "networks.lora" and header["ss_network_dim"] == "2"
    assert (
        header["modelspec.architecture"]
        == {"sd": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}[family]
    )
    assert header["modelspec.resolution"] == "16x16" and header["ss_max_train_steps"] == "2"
    assert header["ss_sample_steps"] == "2" and header["ss_sample_seed"] == "0"

    ours = tmp_path / "ours.png"
    assert main(["generate", "--base", str(base), "--adapter", str(run), *DRAW, "--out", str(ours)]) == 0
    theirs = _diffusers_image(base, lora)
    assert np.abs(_png(ours) - theirs).max() <= 1
    assert np.abs(theirs - _diffusers_image(base, None)).max() > 0  # the LoRA changes the image
    # ...and the studio reads its own kohya file back to the same image.
    again = tmp_path / "again.png"
    assert main(["generate", "--base", str(base), "--adapter", str(lora), *DRAW, "--out", str(again)]) == 0
    assert np.abs(_png(again) - _png(ours)).max() <= 1


def _third_party_sd_lora(base: Path, path: Path, with_text_encoder: bool) -> dict[str, torch.Tensor]:
    """A LoRA file as kohya's sd-scripts lays it out for SD 1.x (documented key names, rank 4, alpha 1),
    on the UNet's attention projections (and the text encoder's q/v)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True, use_safetensors=True)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    tensors = {}
    modules = [("lora_unet_", pipe.unet, ("to_q", "to_v", "to_out.0"))]
    if with_text_encoder:
        modules.append(("lora_te_", pipe.text_encoder, ("q_proj", "v_proj")))
    for prefix, model, suffixes in modules:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(suffixes):
                key = prefix + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.5
                tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.5
                tensors[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return tensors


def test_a_third_party_kohya_lora_stacks_at_generation_and_unknown_keys_are_named(bases, tmp_path):
    base = bases / "sd"
    lora = tmp_path / "someone.safetensors"
    tensors = _third_party_sd_lora(base, lora, with_text_encoder=True)

    alone = tmp_path / "alone.png"
    assert main(["generate", "--base", str(base), "--adapter", str(lora), *DRAW, "--out", str(alone)]) == 0
    # alpha / rank and the text encoder's part too. (diffusers 0.42's own kohya path cannot read a text encoder's
    # self-attention keys, "Could not automatically infer state dict type", so the reference merges by hand.)
    assert np.abs(_png(alone) - _diffusers_image(base, None, merge=tensors)).max() <= 1

    assert (
        main(["train-content", str(DATA), "--base", str(base), "--rank", "2", *FAST, "--runs-dir", str(tmp_path / "r")])
        == 0
    )
    run = _run(tmp_path / "r")
    stacked, ours = tmp_path / "stacked.png", tmp_path / "ours.png"
    assert main(["generate", "--base", str(base), "--adapter", str(run), *DRAW, "--out", str(ours)]) == 0
    both = ["--adapter", str(run), "--adapter", f"{lora}:0.5"]
    assert main(["generate", "--base", str(base), *both, *DRAW, "--out", str(stacked)]) == 0
    assert np.abs(_png(stacked) - _png(ours)).max() > 0 and np.abs(_png(stacked) - _png(alone)).max() > 0

    broken = tmp_path / "broken.safetensors"
    save_file({**tensors, "lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(4, 8)}, str(broken))
    code = main(["generate", "--base", str(base), "--adapter", str(broken), *DRAW, "--out", str(tmp_path / "x.png")])
    assert code != 0 and not (tmp_path / "x.png").exists()


def test_init_adapter_starts_training_from_a_third_party_lora(bases, tmp_path, capsys):
    base = bases / "sd"
    lora = tmp_path / "someone.safetensors"
    tensors = _third_party_sd_lora(base, lora, with_text_encoder=False)
    train = ["train-content", str(DATA), "--base", str(base), *FAST, "--steps", "1", "--learning-rate", "1e-12"]
    assert main([*train, "--init-adapter", str(lora), "--runs-dir", str(tmp_path / "runs")]) == 0
    run = _run(tmp_path / "runs")
    saved = read_safetensors(run / "adapter" / "content" / "adapter_model.safetensors")
    config = json.loads((run / "adapter" / "content" / "adapter_config.json").read_text())["config"]
    assert config["method"] == "lora" and config["r"] == 4
    # After one step at lr 1e-12 the adapter is the file's: B A * (alpha / rank) per module.
    for key in [k for k in tensors if k.endswith("lora_down.weight")]:
        stem = key[: -len(".lora_down.weight")]
        expected = tensors[f"{stem}.lora_up.weight"] @ tensors[key] * (1.0 / 4)
        (a_key,) = [
            k
            for k in saved
            if k.endswith("lora_A") and k.replace(".", "_").endswith(stem[len("lora_unet_") :] + "_lora_A")
        ]
        got = saved[a_key.replace("lora_A", "lora_B")] @ saved[a_key]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    with_text = tmp_path / "with_text.safetensors"
    _third_party_sd_lora(base, with_text, with_text_encoder=True)
    code = main([*train, "--init-adapter", str(with_text), "--runs-dir", str(tmp_path / "other")])
    assert code != 0 and "also adapts text_encoder" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "other", ignore_errors=True)


def test_kohya_export_of_a_dit_points_to_the_diffusers_format(tmp_path, capsys):
    from micro_families import micro_flux

    base = tmp_path / "flux"
    micro_flux(base)
    assert main(["train-content", str(DATA), "--base", str(base), *FAST, "--runs-dir", str(tmp_path / "runs")]) == 0
    out = tmp_path / "x.safetensors"
    code = main(["export", str(_run(tmp_path / "runs")), "--base", str(base), "--format", "kohya", "--out", str(out)])
    assert code != 0 and "--format diffusers" in capsys.readouterr().err and not out.exists()
