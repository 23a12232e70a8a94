"""Every diffusion CLI command, end to end on the embedded tiny SD, for a few steps (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from studio.cli import main

ASSETS = Path(__file__).resolve().parents[2] / "assets"
FAST = ["--steps", "3", "--batch-size", "2", "--sample-steps", "2", "--checkpoint-every", "2"]


def only_run(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if (p / "run.json").is_file()]
    return run


def test_train_style_defaults_to_the_embedded_demo_and_writes_a_finished_run(tmp_path, capsys):
    assert main(["train-style", "--runs-dir", str(tmp_path), *FAST]) == 0
    run = only_run(tmp_path)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["step"] == 3
    assert (run / "adapter" / "style" / "adapter_model.safetensors").is_file()
    assert (run / "samples" / "final.png").is_file()
    assert (run / "config.yaml").is_file() and (run / "logs" / "events.jsonl").is_file()
    assert str(run / "samples" / "final.png") in capsys.readouterr().out


def test_resume_continues_an_interrupted_run_to_the_same_adapter(tmp_path):
    from peft_core.io import read_safetensors

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["train-style", "--runs-dir", str(straight), *FAST, "--steps", "4"]) == 0
    expected = read_safetensors(only_run(straight) / "adapter" / "style" / "adapter_model.safetensors")

    assert main(["train-style", "--runs-dir", str(interrupted), *FAST, "--steps", "4"]) == 0
    run = only_run(interrupted)
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # as if killed between step 2 and step 4
    assert main(["train-style", "--resume", str(run)]) == 0
    resumed = read_safetensors(run / "adapter" / "style" / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0)


def test_train_content_on_a_user_folder_with_a_trigger_template(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for source in sorted((ASSETS / "sets" / "content-moon").glob("*.png"))[:4]:
        shutil.copy(source, data / source.name)
    code = main(
        [
            "train-content",
            str(data),
            "--template",
            "a {trigger}",
            "--trigger",
            "moon",
            "--method",
            "paca",
            "--rank",
            "8",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--name",
            "my moon",
            *FAST,
        ]
    )
    assert code == 0
    run = only_run(tmp_path / "runs")
    assert run.name == "my-moon"
    assert json.loads((run / "adapter" / "content" / "adapter_config.json").read_text())["config"]["method"] == "paca"


def test_bad_image_folder_fails_cleanly_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "images"
    data.mkdir()
    (data / "broken.png").write_bytes(b"not a png at all")
    (data / "broken.txt").write_text("a caption")
    assert main(["train-style", str(data), "--runs-dir", str(tmp_path / "runs"), *FAST]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_generate_compose_export_and_b4m(tmp_path):
    runs = tmp_path / "runs"
    assert main(["train-style", "--runs-dir", str(runs), "--name", "style", *FAST]) == 0
    assert main(["train-content", "--runs-dir", str(runs), "--name", "content", *FAST]) == 0

    out = tmp_path / "generated.png"
    assert (
        main(
            [
                "generate",
                "--prompt",
                "a star in neon style",
                "--adapter",
                f"{runs / 'style'}:0.8",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.is_file()
    composed = tmp_path / "composed.png"
    assert (
        main(
            [
                "compose",
                "--content",
                str(runs / "content"),
                "--style",
                str(runs / "style"),
                "--prompt",
                "a moon in neon style",
                "--prompt",
                "a moon",
                "--steps",
                "2",
                "--out",
                str(composed),
            ]
        )
        == 0
    )
    assert composed.is_file()

    assert (
        main(
            [
                "break-for-make",
                "--runs-dir",
                str(runs),
                "--name",
                "b4m",
                "--break-steps",
                "2",
                "--make-steps",
                "1",
                "--batch-size",
                "2",
                "--rank",
                "4",
                "--riemannian",
            ]
        )
        == 0
    )
    b4m_run = runs / "b4m"
    assert (b4m_run / "b4m" / "b4m.json").is_file() and (b4m_run / "samples" / "final.png").is_file()
    assert json.loads((b4m_run / "b4m" / "b4m.json").read_text())["config"]["riemannian"] is True
    assert (
        main(
            [
                "compose",
                "--b4m",
                str(b4m_run),
                "--prompt",
                "a moon in neon style",
                "--steps",
                "2",
                "--style-weight",
                "1.2",
                "--out",
                str(tmp_path / "b4m.png"),
            ]
        )
        == 0
    )

    # As if killed during the style break: only the content break survives; --resume finishes the run
    # with the same joint adapter.
    from peft_core.io import read_safetensors

    joint = read_safetensors(b4m_run / "b4m" / "joint" / "adapter_model.safetensors")
    shutil.rmtree(b4m_run / "b4m")
    shutil.rmtree(b4m_run / "stages" / "style")
    (b4m_run / "samples" / "final.png").unlink()
    assert main(["break-for-make", "--resume", str(b4m_run)]) == 0
    resumed = read_safetensors(b4m_run / "b4m" / "joint" / "adapter_model.safetensors")
    assert resumed.keys() == joint.keys()
    for key in joint:
        torch.testing.assert_close(resumed[key], joint[key], rtol=0, atol=0)
    assert (b4m_run / "samples" / "final.png").is_file()

    exported = tmp_path / "exported"
    assert main(["export", str(runs / "style"), "--format", "diffusers", "--out", str(exported)]) == 0
    assert (exported / "pytorch_lora_weights.safetensors").is_file()


def test_diffusers_load_lora_weights_gives_the_same_images_as_our_pipeline(tmp_path):
    from peft_core import load
    from pipelines import load_base
    from pipelines.train import generate

    runs = tmp_path / "runs"
    assert main(["train-style", "--runs-dir", str(runs), "--name", "style", *FAST]) == 0
    assert main(["export", str(runs / "style"), "--format", "diffusers", "--out", str(tmp_path / "exported")]) == 0

    ours = load_base("embedded", device="cpu")
    load(ours.unet, runs / "style" / "adapter" / "style")
    theirs = load_base("embedded", device="cpu")
    theirs.load_lora_weights(str(tmp_path / "exported"))
    base = load_base("embedded", device="cpu")
    prompts = ["a star in neon style"]
    ours_image, theirs_image, base_image = (
        np.asarray(generate(p, prompts, seed=3, steps=3)[0], dtype=np.float32) for p in (ours, theirs, base)
    )
    assert np.abs(ours_image - theirs_image).max() <= 2  # same picture, up to uint8 rounding
    assert np.abs(ours_image - base_image).max() > 2  # and the adapter does change it
