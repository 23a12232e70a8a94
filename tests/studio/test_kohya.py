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


# diffusers' kohya Flux converter splits single blocks' linear1 at FLUX.1's own widths (3 x 3072 + 12288), which
# a micro model lacks: the micro run adapts the double blocks (fused qkv included), the converter test below
# takes single blocks at the real widths.
DOUBLE_BLOCKS = r"re:transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|ff\.net\.0\.proj)"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dit_kohya_export_loads_in_diffusers_to_the_studio_image(tmp_path, family):
    from diffusers import DiffusionPipeline
    from micro_families import micro_flux, micro_sd3

    base = tmp_path / family
    {"sd3": micro_sd3, "flux": micro_flux}[family](base)
    targets = ["--targets", DOUBLE_BLOCKS] if family == "flux" else []
    train = ["train-content", str(DATA), "--base", str(base), "--rank", "2", *targets, *FAST]
    assert main([*train, "--runs-dir", str(tmp_path / "runs")]) == 0
    run = _run(tmp_path / "runs")
    lora = tmp_path / "moon.safetensors"
    assert main(["export", str(run), "--base", str(base), "--format", "kohya", "--out", str(lora)]) == 0

    with safe_open(str(lora), framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 - safe_open has no __iter__
        header = file.metadata()
    assert header["modelspec.architecture"] == {"sd3": "stable-diffusion-3/lora", "flux": "flux-1-dev/lora"}[family]
    assert header["ss_network_dim"] == "2" and header["ss_max_train_steps"] == "2"
    assert header["modelspec.resolution"] == "16x16" and header["ss_sample_seed"] == "0"
    if family == "sd3":
        assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    else:
        qkv = "lora_unet_double_blocks_0_img_attn_qkv"
        assert {k.split(".")[0] for k in tensors} == {
            f"lora_unet_double_blocks_0_{layer}"
            for layer in ("img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj", "img_mlp_0")
        }
        assert tensors[f"{qkv}.lora_down.weight"].shape[0] == 6 and tensors[f"{qkv}.alpha"] == 6
        up = tensors[f"{qkv}.lora_up.weight"]  # block-diagonal: q's rows use only q's two ranks
        assert up[:16, :2].abs().sum() > 0 and up[:16, 2:].abs().sum() == 0

    def image(lora: Path | None) -> np.ndarray:
        pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
            # Every module LoRA of the file arrived: its keys, in diffusers' names, are all in the model.
            # (Flux: q, k, v, out, their text twins and the MLP input of the double block: 9 modules.)
            loaded = {n: p.detach() for n, p in pipe.transformer.named_parameters() if ".lora_" in n}
            assert len(loaded) == 2 * {"sd3": len(tensors) // 2, "flux": 9}[family]
            # ...holding all of the file's ups (a block-diagonal up splits into its diagonal blocks: same total).
            ups = sum(
                float(t.abs().sum()) for k, t in tensors.items() if k.endswith(("lora_B.weight", "lora_up.weight"))
            )
            assert sum(float(t.abs().sum()) for k, t in loaded.items() if ".lora_B." in k) == pytest.approx(ups) != 0
        picture = pipe(
            "a moon", num_inference_steps=3, guidance_scale=2.0, height=16, width=16,
            generator=[torch.Generator("cpu").manual_seed(0)],
        ).images[0]  # fmt: skip
        return np.asarray(picture.convert("RGB"), dtype=np.int16)

    ours = tmp_path / "ours.png"
    assert main(["generate", "--base", str(base), "--adapter", str(run), *DRAW, "--out", str(ours)]) == 0
    theirs = image(lora)
    assert np.abs(_png(ours) - theirs).max() <= 1
    assert np.abs(theirs - image(None)).max() > 0  # the LoRA changes the image
    # The studio reads its own file back: the same adapter (B A per module), so the same image.
    from pipelines import load_base
    from pipelines.kohya import load_lora_file

    studio_pipe = load_base(str(base), device="cpu")
    handle = load_lora_file(studio_pipe, lora, name="file")["transformer"]
    trained = read_safetensors(run / "adapter" / "content" / "adapter_model.safetensors")
    from peft_core.export import lora_factors

    imported = lora_factors(handle, "file")
    assert len(imported) == len([k for k in trained if k.endswith("lora_A")]) > 0
    again = tmp_path / "again.png"
    assert main(["generate", "--base", str(base), "--adapter", str(lora), *DRAW, "--out", str(again)]) == 0
    assert np.abs(_png(again) - _png(ours)).max() <= 1


def test_flux_single_blocks_fuse_as_kohya_writes_them_and_diffusers_splits_them_back():
    """At FLUX.1's widths (hidden 3072, MLP 12288; layers on the meta device, only the LoRA factors are real):
    linear1 holds q, k, v and the MLP input as one rank-4r LoRA that diffusers' kohya converter and our import
    both split back into the four rank-r LoRAs; a part the adapter leaves out is zeros and loads as nothing."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from pipelines.kohya import _fuse_flux, _split_flux

    with torch.device("meta"):
        block = torch.nn.Module()
        block.attn = torch.nn.Module()
        for name in ("to_q", "to_k", "to_v"):
            setattr(block.attn, name, torch.nn.Linear(3072, 3072))
        block.proj_mlp, block.proj_out = torch.nn.Linear(3072, 12288), torch.nn.Linear(15360, 3072)
        transformer = torch.nn.Module()
        transformer.transformer_blocks = torch.nn.ModuleList()
        transformer.single_transformer_blocks = torch.nn.ModuleList([block])
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "attn.to_q": (3072, 3072),
        "attn.to_k": (3072, 3072),
        "proj_mlp": (12288, 3072),
        "proj_out": (3072, 15360),
    }
    factors = {
        f"single_transformer_blocks.0.{name}": (
            torch.randn(2, fan_in, generator=generator),
            torch.randn(out, 2, generator=generator),
        )
        for name, (out, fan_in) in shapes.items()
    }
    fused = _fuse_flux(transformer, factors)
    assert set(fused) == {"lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"}
    state = {}
    for stem, (down, up) in fused.items():
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
        state[f"{stem}.alpha"] = torch.tensor(float(down.shape[0]))
    assert state["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (8, 3072)

    theirs = _convert_kohya_flux_lora_to_diffusers(dict(state))
    ours = _split_flux(transformer, state)
    assert not [k for k in ours if k.startswith("lora_unet_single_blocks")]  # every fused key was split
    for module, (A, B) in factors.items():
        key = "transformer." + module
        assert theirs[f"{key}.lora_A.weight"].shape == A.shape  # split back to rank 2, not 8
        torch.testing.assert_close(theirs[f"{key}.lora_B.weight"] @ theirs[f"{key}.lora_A.weight"], B @ A)
        stem = "lora_unet_" + module.replace(".", "_")
        down, up, alpha = (ours[f"{stem}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha"))
        torch.testing.assert_close(up @ down * (alpha / down.shape[0]), B @ A)
    # to_v was not adapted: diffusers gets an all-zero LoRA for it, our import none.
    assert not theirs["transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight"].any()
    assert "lora_unet_single_transformer_blocks_0_attn_to_v.lora_down.weight" not in ours


def test_a_flux_adapter_on_layers_outside_the_blocks_is_refused_with_the_way_out(tmp_path):
    from micro_families import micro_flux

    from peft_core import LoraConfig, attach
    from pipelines.kohya import kohya_tensors

    pipe = micro_flux(tmp_path, save=False)
    handle = attach(pipe.transformer, LoraConfig(targets=["x_embedder", "attn.to_q"], r=2), name="a")
    with pytest.raises(Exception, match=r"x_embedder: export it with --format diffusers"):
        kohya_tensors(pipe, {"transformer": (handle, "a")})
