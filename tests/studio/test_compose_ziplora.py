"""`studio compose --combine ziplora` end to end on the embedded tiny SD (CPU): two quick runs, the merge
learned on their own training images, saved as a plain LoRA that `studio generate` draws identically."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from studio.cli import main

FAST = ["--steps", "2", "--batch-size", "2", "--sample-steps", "2", "--checkpoint-every", "2", "--rank", "2"]


def test_ziplora_compose_saves_a_lora_that_generate_draws_the_same(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train-style", "--runs-dir", str(runs), "--name", "style", *FAST]) == 0
    assert main(["train-content", "--runs-dir", str(runs), "--name", "content", *FAST]) == 0
    composed, merged = tmp_path / "zip.png", tmp_path / "merged"
    prompt = ["--prompt", "a moon in neon style", "--steps", "2", "--seed", "3"]
    code = main(
        [
            "compose",
            "--content",
            f"{runs / 'content'}:0.9",
            "--style",
            str(runs / "style"),
            "--combine",
            "ziplora",
            "--zip-steps",
            "3",
            "--save-merged",
            str(merged),
            *prompt,
            "--out",
            str(composed),
        ]
    )
    assert code == 0, capsys.readouterr().err
    record = json.loads((merged / "ziplora.json").read_text())
    assert len(record["loss_log"]) == 3 and record["config"]["zip_steps"] == 3
    config = json.loads((merged / "adapter_config.json").read_text())["config"]
    assert config["method"] == "lora" and config["r"] == 4  # rank 2 + 2

    drawn = tmp_path / "drawn.png"
    assert main(["generate", "--adapter", str(merged), *prompt, "--out", str(drawn)]) == 0
    assert np.array_equal(np.asarray(Image.open(composed)), np.asarray(Image.open(drawn)))


def test_ziplora_needs_both_adapters_and_the_training_images(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train-style", "--runs-dir", str(runs), "--name", "style", *FAST]) == 0
    base = ["compose", "--prompt", "a", "--out", str(tmp_path / "x.png")]
    assert main([*base, "--style", str(runs / "style"), "--combine", "ziplora"]) == 2
    assert "pass both --content and --style" in capsys.readouterr().err
    assert main([*base, "--style", str(runs / "style"), "--save-merged", str(tmp_path / "m")]) == 2
    assert "go with --combine ziplora" in capsys.readouterr().err
    bare = runs / "style" / "adapter" / "style"  # an adapter folder whose run moved away
    moved = tmp_path / "bare"
    bare.rename(moved)
    code = main([*base, "--content", str(moved), "--style", str(moved), "--combine", "ziplora", "--steps", "1"])
    assert code == 2
    assert "pass --content-data FOLDER" in capsys.readouterr().err
