"""train_adapter's stop hook: a requested stop checkpoints the step it happened at and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from micro_sd import ColourDataset, micro_pipeline

from peft_core import LoraConfig
from pipelines.checkpoint import latest_checkpoint
from pipelines.train import STOP_FILE, UNET_ATTENTION_TARGETS, StopRequested, TrainConfig, train_adapter


def tensors(handle):
    return {k: v.detach().clone() for k, v in handle.state_dict("default").items()}


def test_stop_file_checkpoints_the_current_step_and_resume_equals_the_straight_run(tmp_path):
    config = LoraConfig(targets=UNET_ATTENTION_TARGETS, r=4)
    train = TrainConfig(steps=6, batch_size=2, learning_rate=5e-3, checkpoint_every=100, lr_schedule="cosine")
    expected = tensors(
        train_adapter(micro_pipeline(tmp_path / "a"), ColourDataset(), config, train, tmp_path / "straight")
    )

    run = tmp_path / "stopped"
    run.mkdir()  # as Run.create makes it
    events = []

    def request_stop_at_four(event):  # what the UI does from another process: create run/STOP
        events.append(event)
        if event.kind == "step" and event.step == 4:
            (run / STOP_FILE).touch()

    with pytest.raises(StopRequested, match="after step 4 of 6"):
        train_adapter(
            micro_pipeline(tmp_path / "b"), ColourDataset(), config, train, run, on_event=request_stop_at_four
        )
    assert isinstance(StopRequested(), KeyboardInterrupt)  # callers' Ctrl-C handling covers it
    assert latest_checkpoint(run).name == "step-00000004"  # written although checkpoint_every is 100
    assert [e.kind for e in events][-2:] == ["step", "checkpoint"]
    assert not (run / STOP_FILE).exists() and not (run / "adapter").exists()

    resumed = train_adapter(micro_pipeline(tmp_path / "c"), ColourDataset(), config, train, run)
    for key, value in tensors(resumed).items():
        assert torch.equal(value, expected[key]), key


def test_should_stop_callback_and_no_stop_after_the_last_step(tmp_path):
    config = LoraConfig(targets=UNET_ATTENTION_TARGETS, r=4)
    train = TrainConfig(steps=3, batch_size=1, checkpoint_every=2)
    asked = []
    with pytest.raises(StopRequested):
        train_adapter(
            micro_pipeline(tmp_path / "a"),
            ColourDataset(),
            config,
            train,
            tmp_path / "r1",
            should_stop=lambda: asked.append(1) or len(asked) == 2,
        )
    assert latest_checkpoint(tmp_path / "r1").name == "step-00000002"  # the regular checkpoint, not written twice
    # A request arriving with the last step is moot: the run finishes and saves its adapter.
    train_adapter(
        micro_pipeline(tmp_path / "b"), ColourDataset(), config, train, tmp_path / "r2", should_stop=lambda: False
    )
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3" / STOP_FILE).touch()
    train_adapter(
        micro_pipeline(tmp_path / "c"), ColourDataset(), config, TrainConfig(steps=1, batch_size=1), tmp_path / "r3"
    )
    assert (tmp_path / "r3" / "adapter" / "default" / "adapter_config.json").is_file()
