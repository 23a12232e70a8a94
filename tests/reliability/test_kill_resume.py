"""SIGKILL a tiny training run at chosen points (several inside checkpoint writes), resume each time,
and check that nothing is lost: bench/kill_resume.py does the work (its --kills 20 run is the full
experiment, committed in bench/results/kill_resume.json); this is the short CI version."""

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
        ("time:1", 1.3),  # anywhere: loading, a step, a write
        ("tmpfile:adapter/:2", None),  # half of the final adapter's weights written
    ]
    result = harness.run_harness(tmp_path, steps=7, plans=plans, log=lambda message: None)
    assert result["kills"] == len(plans)
    assert result["adapter_bit_exact"] and not result["mismatched_tensors"]
    assert result["final_status"] == "finished" and result["final_leftovers"] == []
    # the kills inside writes did leave staging folders / temporaries behind, which the resume removed
    assert result["kills_with_leftovers_before_resume"] >= 2
    # killed half-way through its first checkpoint: no checkpoint yet, only the staging folder
    first = result["lives_detail"][0]
    assert first["checkpoints"] == [] and any(p.endswith(".partial") for p in first["leftovers"])
    assert all(life["checkpoints"] for life in result["lives_detail"][1:])


def test_plans_are_seeded_and_end_with_the_final_writes(harness):
    plans = harness.make_plans(20, seed=0)
    assert plans == harness.make_plans(20, seed=0) and len(plans) == 20
    assert [p for p, _ in plans[-3:]] == [f"{point}:1" for point in harness.END_POINTS]
    assert any(p.startswith("tmpfile:checkpoints/") for p, _ in plans)
