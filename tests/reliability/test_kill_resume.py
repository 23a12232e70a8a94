"""SIGKILL a tiny training run at chosen points (several inside checkpoint writes, one while an old
checkpoint is pruned), send SIGINTs inside a checkpoint write, resume each time, and check that nothing
is lost; then SIGINT / SIGTERM a real `studio train-style` at random steps. bench/kill_resume.py does
the work (its default run is the full experiment, committed in bench/results/kill_resume.json); this is
the short CI version."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "bench" / "kill_resume.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("kill_resume", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_killed_and_resumed_run_ends_with_the_uninterrupted_adapter(harness, tmp_path):
    plans = [
        ("tmpfile:checkpoints/:5", None),  # half of a checkpoint's rng.safetensors written
        ("staged:2", None),  # second checkpoint complete in its staging folder, not renamed
        ("renamed:1", None),  # renamed, older checkpoints not pruned yet
        ("pruning:1", None),  # an old checkpoint renamed to .deleting-step-N, half deleted
        ("SIGINT*2@tmpfile:checkpoints/:3", None),  # Ctrl-C, then Ctrl-C again inside a checkpoint file's write
        ("time:1", 0.5),  # anywhere: loading, a step, a write
        ("tmpfile:adapter/:2", None),  # half of the final adapter's weights written
    ]
    result = harness.run_harness(tmp_path, steps=9, plans=plans, log=lambda message: None)
    assert result["kills"] == len(plans) - 1 and result["signal_lives"] == 1
    assert result["adapter_bit_exact"] and not result["mismatched_tensors"]
    assert result["final_status"] == "finished" and result["final_leftovers"] == []
    # the kills inside writes did leave staging folders / temporaries behind, which the resume removed
    assert result["kills_with_leftovers_before_resume"] >= 2
    # killed half-way through its first checkpoint: no checkpoint yet, only the staging folder
    first = result["lives_detail"][0]
    assert first["checkpoints"] == [] and any(p.endswith(".partial") for p in first["leftovers"])
    assert all(life["checkpoints"] for life in result["lives_detail"][1:])
    # a killed run's run.json still says "running"; the runs list sees its writer is gone: "interrupted"
    killed = [life for life in result["lives_detail"] if life["killed"] and life["status"] != "finished"]
    assert all(life["status"] == "running" and life["listed_status"] == "interrupted" for life in killed)
    pruning = next(life for life in result["lives_detail"] if life["plan"] == "pruning:1")
    assert any(".deleting-step-" in path for path in pruning["leftovers"])  # never a half-deleted step-N/
    signalled = next(life for life in result["lives_detail"] if life["signals"])
    # the second SIGINT waited for the checkpoint being written, then stopped the run: exit 130, no leftover
    assert signalled["returncode"] == 130 and signalled["status"] == "interrupted" and not signalled["leftovers"]


def test_sigint_and_sigterm_to_studio_train_style_lose_no_step(harness, tmp_path):
    result = harness.run_signal_harness(tmp_path, signals=2, steps=10, log=lambda message: None)
    assert result["exit_codes"] == [130, 143, 0]  # SIGINT, SIGTERM, then the resume finishes
    assert result["adapter_bit_exact"] and not result["mismatched_tensors"] and not result["final_leftovers"]
    first, second, final = result["lives_detail"]
    # each signal checkpointed the step it came after, and the next life started right after it
    assert first["checkpoint_step"] == first["last_step"] >= first["signal_after_step"]
    assert second["first_step"] == first["checkpoint_step"] + 1
    assert second["checkpoint_step"] == second["last_step"] >= second["signal_after_step"]
    assert final["first_step"] == second["checkpoint_step"] + 1 and final["last_step"] == 10


def test_plans_are_seeded_and_end_with_the_final_writes(harness):
    plans = harness.make_plans(20, seed=0)
    assert plans == harness.make_plans(20, seed=0) and len(plans) == 20
    assert [p for p, _ in plans[-3:]] == [f"{point}:1" for point in harness.END_POINTS]
    assert any(p.startswith("tmpfile:checkpoints/") for p, _ in plans)
    assert any(p.startswith("pruning:") for p, _ in plans)
    with_signals = harness.make_plans(20, seed=0, signals=harness.SIGNAL_PLANS)
    assert [p for p, _ in with_signals[-6:-3]] == harness.SIGNAL_PLANS
    signal_plans = harness.make_signal_plans(6, 24, seed=0)
    assert [name for name, _ in signal_plans] == ["SIGINT", "SIGTERM"] * 3
    assert all(a < b for (_, a), (_, b) in zip(signal_plans, signal_plans[1:])) and signal_plans[-1][1] <= 22
