"""The bench helpers that explain measurements (bench/_common.py): they must report what happened."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from _common import REPO_ROOT, StepPhases, allocation_site, peak_breakdown  # noqa: E402

MIB = 1 << 20


def frame(path: str, line: int, name: str) -> dict:
    return {"filename": path, "line": line, "name": name}


def test_peak_breakdown_finds_the_peak_and_what_was_alive_then():
    ours = [
        frame("/x/site-packages/torch/nn/modules/linear.py", 1, "forward"),
        frame(f"{REPO_ROOT}/peft_core/a.py", 5, "f"),
    ]
    theirs = [frame("/x/site-packages/diffusers/attention.py", 9, "g")]
    events = [
        {"action": "alloc", "addr": 1, "size": 4 * MIB, "frames": ours},
        {"action": "alloc", "addr": 2, "size": 2 * MIB, "frames": theirs},
        {"action": "free_requested", "addr": 1, "size": 4 * MIB},  # still counted until completed
        {"action": "alloc", "addr": 3, "size": 1 * MIB, "frames": theirs},  # the peak: 1 + 4 + 2 + 1 MiB
        {"action": "free_completed", "addr": 1, "size": 4 * MIB},
        {"action": "free_completed", "addr": 99, "size": 1 * MIB},  # allocated before the trace
        {"action": "alloc", "addr": 4, "size": 3 * MIB, "frames": ours},  # 1 - 1 + 2 + 1 + 3 = 6 MiB < 8
    ]
    report = peak_breakdown(events, start_bytes=1 * MIB)
    assert report["peak_mib"] == 8.0 and report["peak_event"] == 3 and report["before_trace_mib"] == 1.0
    assert report["sites"] == [
        {"site": "peft_core/a.py:5 (f)", "mib": 4.0, "blocks": 1},
        {"site": "diffusers/attention.py:9 (g)", "mib": 3.0, "blocks": 2},
    ]


def test_allocation_site_skips_torch_frames_and_says_when_there_is_no_python():
    frames = [
        frame("/v/lib/site-packages/torch/autograd/graph.py", 3, "backward"),
        frame(f"{REPO_ROOT}/bench/x.py", 7, "step"),
    ]
    assert allocation_site(frames) == "bench/x.py:7 (step)"
    assert allocation_site([]) == "torch internals / no Python frame"


def test_step_phases_records_every_phase_and_gc_pauses():
    phases = StepPhases("cpu")
    try:
        for _ in range(3):
            phases.begin()
            torch.randn(64, 64) @ torch.randn(64, 64)
            phases.mark("forward")
            gc.collect()  # a pause the record must attribute to the step
            phases.mark("backward")
            phases.end()
    finally:
        phases.close()
    summary = phases.summary()
    assert len(summary["steps"]) == 3
    assert set(summary["median"]) >= {"wall_ms", "forward_host_ms", "backward_host_ms", "gc_ms"}
    assert all(step["gc_collections"][2] >= 1 and step["gc_ms"] > 0 for step in summary["steps"])
    assert phases._on_gc not in gc.callbacks
