"""SDXL, SD3 and Flux through the CLI, on micro pipelines saved as diffusers folders (as a user's
model folder): train, resume, export, and the diffusers pipeline loading the export to the same image;
Break-for-Make break -> make -> compose on a DiT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peft_core.io import read_safetensors
from pipelines.errors import UserError
from studio.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from micro_families import micro_flux, micro_sd3, micro_sdxl  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "assets"
BUILDERS = {"sdxl": micro_sdxl, "sd3": micro_sd3, "flux": micro_flux}
# 16 px images: the micro VAEs have a factor of 2 and the DiTs 2x2 patches, so 16 px is 4x4 tokens.
FAST = ["--resolution", "16", "--steps", "2", "--batch-size", "2", "--sample-steps", "2", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    for name, build in BUILDERS.items():
        build(root / name)
    return root


def _run(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if (p / "run.json").is_file()]
    return run


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(run / "adapter" / "content" / "adapter_model.safetensors")


def _image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("method", ["lora", "paca", "plp"])
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_train_resume_export_and_the_diffusers_pipeline_gives_the_same_image(bases, tmp_path, family, method):
    base, data = bases / family, ASSETS / "sets" / "content-moon"
    train = ["train-content", str(data), "--base", str(base), "--method", method, "--rank", "2", *FAST]

    # Two steps straight, and the same run killed after step 1 and resumed: the same adapter.
    assert main([*train, "--runs-dir", str(tmp_path / "straight")]) == 0
    straight = _run(tmp_path / "straight")
    record = json.loads((straight / "run.json").read_text())
    assert record["status"] == "finished"
    assert "family: " + family in (straight / "config.yaml").read_text()
    assert main([*train, "--runs-dir", str(tmp_path / "killed")]) == 0
    killed = _run(tmp_path / "killed")
    shutil.rmtree(killed / "adapter")
    shutil.rmtree(killed / "checkpoints" / "step-00000002")
    assert main(["train-content", "--resume", str(killed)]) == 0
    expected, resumed = _adapter(straight), _adapter(killed)
    assert expected.keys() == resumed.keys() and expected
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0)

    # The studio's image, and the diffusers pipeline's with the export loaded by load_lora_weights.
    ours = tmp_path / "ours.png"
    prompt = ["--prompt", "a moon", "--size", "16", "--steps", "3", "--guidance", "2.0"]
    assert main(["generate", "--base", str(base), "--adapter", str(straight), *prompt, "--out", str(ours)]) == 0
    implied = tmp_path / "implied.png"  # no --base: the run's own base (and family) from its config.yaml
    assert main(["generate", "--adapter", str(straight), *prompt, "--out", str(implied)]) == 0
    assert np.array_equal(_image(implied), _image(ours))
    export = tmp_path / "export"
    assert main(["export", str(straight), "--base", str(base), "--format", "diffusers", "--out", str(export)]) == 0
    implied_export = tmp_path / "implied-export"  # no --base: the run's own
    assert main(["export", str(straight), "--format", "diffusers", "--out", str(implied_export)]) == 0
    exported, implied = (read_safetensors(d / "pytorch_lora_weights.safetensors") for d in (export, implied_export))
    assert exported.keys() == implied.keys() and all(torch.equal(exported[k], implied[k]) for k in exported)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(export)
    theirs = pipe(
        "a moon", num_inference_steps=3, guidance_scale=2.0, height=16, width=16,
        generator=[torch.Generator("cpu").manual_seed(0)],
    ).images[0]  # fmt: skip
    base_image = DiffusionPipeline.from_pretrained(base, local_files_only=True, use_safetensors=True)(
        "a moon", num_inference_steps=3, guidance_scale=2.0, height=16, width=16,
        generator=[torch.Generator("cpu").manual_seed(0)],
    ).images[0]  # fmt: skip
    difference = np.abs(_image(ours) - np.asarray(theirs.convert("RGB"), dtype=np.int16))
    assert difference.max() <= 1, f"the exported LoRA gives another image (max pixel difference {difference.max()})"
    # ...and the adapter changes the image (an export whose keys load but do nothing would pass the above alone).
    assert np.abs(_image(ours) - np.asarray(base_image, dtype=np.int16)).max() > 0


def test_break_for_make_then_compose_on_a_dit(bases, tmp_path):
    base, data, style = bases / "flux", ASSETS / "sets" / "content-moon", ASSETS / "sets" / "style-neon"
    run_args = ["--content", str(data), "--style", str(style), "--aux-styles", "--aux-contents"]
    code = main(
        [
            "break-for-make",
            *run_args,
            "--base",
            str(base),
            "--resolution",
            "16",
            "--rank",
            "2",
            "--break-steps",
            "2",
            "--make-steps",
            "2",
            "--batch-size",
            "2",
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
    )
    assert code == 0
    run = _run(tmp_path / "runs")
    assert json.loads((run / "b4m" / "b4m.json").read_text())["adapters"] == ["content", "style", "joint"]
    config = json.loads((run / "b4m" / "joint" / "adapter_config.json").read_text())["config"]
    assert config["method"] == "plp"
    out = tmp_path / "composed.png"
    compose = ["compose", "--b4m", str(run), "--base", str(base), "--prompt", "a moon in neon style", "--size", "16"]
    assert main([*compose, "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (16, 16)


def test_two_cpu_processes_equal_one_at_the_same_global_batch(bases, tmp_path):
    """gloo DDP, 2 processes x batch 1 == 1 process x batch 2: each process keeps its rows of the draws
    made for the global batch, gradients are averaged, the logged loss is the global batch's."""
    repo = Path(__file__).resolve().parents[2]
    common = [
        str(ASSETS / "sets" / "content-moon"),
        "--base",
        str(bases / "flux"),
        "--device",
        "cpu",
        *FAST,
        "--steps",
        "3",
    ]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "studio.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    two = [*launch, "train-content", *common, "--batch-size", "1", "--runs-dir", str(tmp_path / "two")]
    launched = subprocess.run(two, env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert main(["train-content", *common, "--batch-size", "2", "--runs-dir", str(tmp_path / "one")]) == 0

    def curve(run: Path) -> list[float]:
        lines = (run / "logs" / "events.jsonl").read_text().splitlines()
        return [event["loss"] for event in map(json.loads, lines) if event.get("kind") == "step"]

    one, two_run = _run(tmp_path / "one"), _run(tmp_path / "two")
    torch.testing.assert_close(torch.tensor(curve(two_run)), torch.tensor(curve(one)), rtol=1e-4, atol=1e-5)
    expected, got = _adapter(one), _adapter(two_run)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


def test_memory_levers_bf16_base_and_an_nf4_base_train_and_resume(bases, tmp_path):
    """--base-dtype bfloat16 (with bf16 autocast) and --base-quantization nf4 (bitsandbytes 4-bit Linear layers,
    QLoRA-style) on Flux: the run trains, its config records both, and a resume rebuilds the same base."""
    base = str(bases / "flux")
    data = str(ASSETS / "sets" / "content-moon")
    for name, levers in {
        "bf16": ["--base-dtype", "bfloat16", "--mixed-precision", "bf16", "--gradient-checkpointing"],
        "nf4": ["--base-quantization", "nf4", "--method", "paca"],
    }.items():
        train = ["train-content", data, "--base", base, "--rank", "2", *FAST, *levers, "--device", "cpu"]
        assert main([*train, "--runs-dir", str(tmp_path / name)]) == 0
        run = _run(tmp_path / name)
        config = (run / "config.yaml").read_text()
        assert ("base_dtype: bfloat16" if name == "bf16" else "base_quantization: nf4") in config
        expected = _adapter(run)
        shutil.rmtree(run / "adapter")
        shutil.rmtree(run / "checkpoints" / "step-00000002")
        assert main(["train-content", "--resume", str(run)]) == 0
        for key, value in _adapter(run).items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--base-dtype", "bfloat16"], "add --mixed-precision bf16"),
        (["--base-quantization", "nf4", "--method", "corda"], "method 'corda' cannot train on a 4-bit base"),
        (["--resolution", "18"], "resolution must be a multiple of 8"),
        (["--train-text-encoder"], "not yet on Flux.1"),
        (["--family", "sdxl"], "could not load the diffusers folder"),
    ],
)
def test_bad_family_settings_fail_with_one_line_and_write_nothing(bases, tmp_path, capsys, flags, message):
    train = ["train-content", str(ASSETS / "sets" / "content-moon"), "--base", str(bases / "flux"), *FAST[2:]]
    assert main([*train, *flags, "--runs-dir", str(tmp_path / "runs")]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_cached_captions_and_latents_train_like_the_uncached_run(bases, tmp_path, family):
    """--cache-text-embeddings --cache-latents: every caption and image is encoded once (encoders then on
    the CPU); the step's draws are unchanged, so the losses and the adapter equal the uncached run's."""
    train = ["train-content", str(ASSETS / "sets" / "content-moon"), "--base", str(bases / family), *FAST]
    train += ["--steps", "3"]
    assert main([*train, "--runs-dir", str(tmp_path / "plain")]) == 0
    cached = [*train, "--cache-text-embeddings", "--cache-latents", "--runs-dir", str(tmp_path / "cached")]
    assert main(cached) == 0

    def curve(run: Path) -> list[float]:
        lines = (run / "logs" / "events.jsonl").read_text().splitlines()
        return [event["loss"] for event in map(json.loads, lines) if event.get("kind") == "step"]

    plain, cache = _run(tmp_path / "plain"), _run(tmp_path / "cached")
    torch.testing.assert_close(torch.tensor(curve(cache)), torch.tensor(curve(plain)), rtol=1e-5, atol=1e-6)
    expected = _adapter(plain)
    # A caption encoded alone vs in a batch differs in the last bits; Adam's first steps divide tiny gradients
    # by their own magnitude, so the weights agree to a small fraction of one step (lr 3e-3), not to 1e-6.
    for key, value in _adapter(cache).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-3, atol=2e-4)
    assert (cache / "samples" / "final.png").is_file()  # the grid brought the offloaded encoders back


def test_cached_latents_refuse_random_crops_and_take_flips():
    from pipelines.step_cache import check_deterministic_pixels

    class Flipping:
        random_flip, crop = True, "center"

    class Cropping:
        random_flip, crop = False, "random"

    check_deterministic_pixels(Flipping())  # both orientations are cached (test_train_options.py)
    with pytest.raises(UserError, match="center crops"):
        check_deterministic_pixels(Cropping())


@pytest.mark.parametrize(
    ("family", "method", "extra"),
    [("sd3", "corda", []), ("flux", "spt", []), ("sdxl", "compacter", ["--set", "bottleneck=4"])],
)
def test_the_data_and_bottleneck_methods_train_on_every_kind_of_denoiser(bases, tmp_path, family, method, extra):
    """CorDA and SPT run their data step on the run's own images through the family's objective;
    Compacter places its adapters after the family's attention and feed-forward outputs."""
    train = ["train-content", str(ASSETS / "sets" / "content-moon"), "--base", str(bases / family), *FAST]
    assert main([*train, "--method", method, *extra, "--calibration-samples", "4", "--runs-dir", str(tmp_path)]) == 0
    run = _run(tmp_path)
    assert json.loads((run / "adapter" / "content" / "adapter_config.json").read_text())["config"]["method"] == method
    assert _adapter(run)


def test_generate_defaults_to_the_base_its_adapters_trained_on(tmp_path):
    from studio.generate import trained_base

    def run(name: str, base: str | None, family: str = "auto") -> Path:
        folder = tmp_path / name
        (folder / "adapter" / "style").mkdir(parents=True)
        (folder / "config.yaml").write_text(f"kind: train-style\nbase: {base or 'null'}\nfamily: {family}\n")
        return folder / "adapter" / "style"

    sdxl, other_sdxl = run("a", "my/sdxl", "sdxl"), run("b", "my/sdxl", "sdxl")
    assert trained_base([sdxl, other_sdxl]) == ("my/sdxl", "sdxl")
    assert trained_base([run("c", None)]) == ("embedded", "auto")
    loose = tmp_path / "loose"  # an adapter folder outside any run: nothing recorded
    loose.mkdir()
    assert trained_base([loose]) == ("embedded", "auto")
    with pytest.raises(UserError, match=r"different base models .*my/sdxl.*my/flux.*; pass --base"):
        trained_base([sdxl, run("d", "my/flux", "flux")])


def test_class_images_are_drawn_by_the_base_once_and_regularise_training(bases, tmp_path):
    """--reg-prompt P --reg-count N: the base model (no adapter) draws N pictures of P into the run before
    training, a resume draws only the missing ones, and they take part in training (prior preservation)."""
    from pipelines import load_base
    from pipelines.train import generate

    base, data = bases / "sdxl", ASSETS / "sets" / "content-moon"
    train = ["train-content", str(data), "--base", str(base), "--method", "lora", "--rank", "2", *FAST]
    regularised = [*train, "--reg-prompt", "a ring", "--reg-count", "3"]
    assert main([*regularised, "--runs-dir", str(tmp_path / "straight")]) == 0
    straight = _run(tmp_path / "straight")
    pictures = sorted((straight / "class_images").glob("*.png"))
    assert [p.name for p in pictures] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    pipe = load_base(str(base), device="cpu")
    (again,) = generate(pipe, ["a ring"], seed=1_000_001, steps=2, guidance=5.0, size=16)
    assert np.array_equal(_image(pictures[1]), np.asarray(again.convert("RGB"), dtype=np.int16))

    # Interrupted after step 1 with a class image lost: the resume draws that one only, and ends where
    # the straight run ended.
    assert main([*regularised, "--runs-dir", str(tmp_path / "killed")]) == 0
    killed = _run(tmp_path / "killed")
    shutil.rmtree(killed / "adapter")
    shutil.rmtree(killed / "checkpoints" / "step-00000002")
    (killed / "class_images" / "class-00002.png").unlink()
    kept = (killed / "class_images" / "class-00000.png").stat().st_mtime_ns
    assert main(["train-content", "--resume", str(killed)]) == 0
    assert (killed / "class_images" / "class-00000.png").stat().st_mtime_ns == kept
    assert np.array_equal(_image(killed / "class_images" / "class-00002.png"), _image(pictures[2]))
    expected, resumed = _adapter(straight), _adapter(killed)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0)

    # The class images change what is learned.
    assert main([*train, "--runs-dir", str(tmp_path / "plain")]) == 0
    plain = _adapter(_run(tmp_path / "plain"))
    assert any(not torch.equal(plain[key], expected[key]) for key in expected if "lora_B" in key)
