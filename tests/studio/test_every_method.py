"""Every registered method trains from every training command with its defaults, as a new user
would try it: `studio train-style --method X`, `train-content --method X`, `train-llm --method X`.

Only the run's size is cut (steps, batch, sample and calibration sizes); the method, its targets and
its hyperparameters are the defaults the method and the command choose (LoRAM is not a registered
adapter method: it is `train-llm --loram-ratio`, tested in tests/studio/test_llm.py)."""

from __future__ import annotations

import pytest
import yaml

from peft_core import available_methods
from studio.cli import main

METHODS = available_methods()
SMALL_IMAGE_RUN = ["--steps", "1", "--batch-size", "1", "--sample-steps", "1", "--calibration-samples", "2"]
SMALL_LLM_RUN = ["--steps", "1", "--batch-size", "2", "--calibration-examples", "2", "--eval-batch-size", "8"]


def test_every_method_is_covered():
    assert {"lora", "paca", "plp", "corda", "spt", "compacter"} <= set(METHODS)


def finished_run(runs_dir):
    (run,) = [p for p in runs_dir.iterdir() if (p / "run.json").is_file()]
    info = yaml.safe_load((run / "run.json").read_text())
    assert info["status"] == "finished", info
    return run, yaml.safe_load((run / "config.yaml").read_text())


@pytest.mark.parametrize("kind", ["style", "content"])
@pytest.mark.parametrize("method", METHODS)
def test_train_images_with_the_methods_defaults(method, kind, tmp_path):
    runs = tmp_path / "runs"
    code = main(
        [f"train-{kind}", "--method", method, "--runs-dir", str(runs), "--sample-prompts", "a star", *SMALL_IMAGE_RUN]
    )
    assert code == 0
    run, config = finished_run(runs)
    assert config["adapter"]["method"] == method
    assert (run / "adapter" / kind / "adapter_model.safetensors").is_file()
    assert (run / "samples" / "final.png").is_file()


@pytest.mark.parametrize("method", METHODS)
def test_train_llm_with_the_methods_defaults(method, tmp_path):
    runs = tmp_path / "runs"
    assert main(["train-llm", "--method", method, "--runs-dir", str(runs), *SMALL_LLM_RUN]) == 0
    run, config = finished_run(runs)
    assert config["adapter"]["method"] == method
    assert (run / "adapter" / "default" / "adapter_model.safetensors").is_file()
