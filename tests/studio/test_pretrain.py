"""`studio pretrain-base`: the recipe runs end to end at toy scale on CPU and documents itself."""

from __future__ import annotations

import json

import pytest

from studio.cli import main


def test_help_documents_the_recipe_and_the_reproducing_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain-base", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "studio pretrain-base --scale full --seed 0 --out assets --device cuda" in text
    assert "--scale full-phase2 --stages sd" in text
    for stage in ("sets", "lm", "sd", "judges"):
        assert f"\n  {stage} " in text
    assert "round trips" in text  # why the judges come after sd


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stages", "sd,paint"], "unknown stage"),
        (["--set", "sd_stepz=3"], "KEY=VALUE"),
        (["--set", "sd_steps=many"], "not a valid int"),
        # The judge is fitted to the sd stage's VAE: without one the stage says how to get one.
        (["--stages", "judges"], "run the sd stage first"),
    ],
)
def test_bad_recipe_input_is_one_line(argv, message, tmp_path, capsys):
    assert main(["pretrain-base", "--out", str(tmp_path), "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_toy_recipe_runs_every_stage_and_reloads(tmp_path):
    from pipelines import load_base, load_embedded_lm

    code = main(
        [
            "pretrain-base",
            "--scale",
            "toy",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--workers",
            "1",
            "--set",
            "sd_images=32",
            "--set",
            "judge_images=64",
            "--set",
            "sanity_prompts=1",
        ]
    )
    assert code == 0
    for folder in ("tiny-sd", "tiny-lm", "judges"):
        record = json.loads((tmp_path / folder / "training.json").read_text())
        assert record["recipe"]["seed"] == 0 and "date" in record
    # sd ran before any judge existed; the judges stage, fitted to its VAE, ran the check instead.
    assert "skipped" in json.loads((tmp_path / "tiny-sd" / "training.json").read_text())["sanity"]
    judges_record = json.loads((tmp_path / "judges" / "training.json").read_text())
    assert set(judges_record["sd_sanity"]) == {"guidance_3.0", "guidance_5.0", "guidance_7.5"}
    assert set(judges_record["heldout_accuracy_after_vae"]) == {"content", "colour", "pattern", "style"}
    assert (tmp_path / "sets" / "content-moon" / "metadata.jsonl").is_file()
    pipeline = load_base(tmp_path / "tiny-sd")
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline("a red star", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)
    model, tokenizer = load_embedded_lm(tmp_path / "tiny-lm")
    assert model.config.vocab_size == len(tokenizer)
    # A second phase continues the saved model instead of starting over.
    assert (
        main(
            [
                "pretrain-base",
                "--scale",
                "toy",
                "--stages",
                "sd",
                "--out",
                str(tmp_path),
                "--device",
                "cpu",
                "--workers",
                "1",
                "--set",
                "sd_images=32",
                "--set",
                "sd_init=same",
                "--set",
                "vae_steps=0",
                "--set",
                "sanity_prompts=1",
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "tiny-sd" / "training.json").read_text())
    # The kept VAE is the one the judge was fitted to, so this stage checks prompt following itself.
    assert "continued_from" in record and "guidance_5.0" in record["sanity"]
