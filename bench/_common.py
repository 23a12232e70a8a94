"""Helpers shared by the benchmarks in bench/: timing, GPU memory, OOM-safe probing, output.

Every bench is a plain script (`python bench/<name>.py`), run from the repository root or not;
`repo_on_path()` makes `import peft_core` work without installing the project (the GPU machine
gets a bare copy of the working tree).
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
GIB = float(1 << 30)


def repo_on_path() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def log(message: str) -> None:
    print(message, flush=True)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    """Drop everything unreachable and give cached blocks back, so the next measurement starts clean."""
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # a variant's peak should not hold the last one's
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocated_gib(device) -> float | None:
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) / GIB


def time_steps(step: Callable[[], Any], device, warmup: int, steps: int, reset_peak: bool = True) -> dict[str, Any]:
    """Run `warmup` untimed then `steps` timed calls of `step` (each synchronized).

    Returns the median/min/mean ms per step, every step's ms, the peak allocated GPU memory
    (GiB) over the timed steps only (None on CPU; with reset_peak=False: since the caller's own
    reset, e.g. before a CUDA graph's capture, whose pool replays never allocate again), and
    `step`'s first and last return values.
    """
    import torch

    is_cuda = torch.device(device).type == "cuda"
    first = last = None
    for _ in range(warmup):
        last = step()
        if first is None:
            first = last
    sync(device)
    if is_cuda and reset_peak:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        last = step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        if first is None:
            first = last
    peak = torch.cuda.max_memory_allocated(device) / GIB if is_cuda else None
    return {
        "ms_per_step": statistics.median(times),
        "ms_min": min(times),
        "ms_mean": statistics.fmean(times),
        "ms_all": [round(t, 3) for t in times],
        "peak_gib": peak,
        "first": first,
        "last": last,
    }


def is_oom(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def try_step(run: Callable[..., Any], device, *args: Any) -> tuple[bool, float]:
    """Run `run(*args)` once; (False, seconds) on out-of-memory, (True, seconds) otherwise.

    The exception (and its traceback, which pins every tensor of the failed step) is dropped
    before memory is cleaned up.
    """
    start = time.perf_counter()
    ok = True
    try:
        run(*args)
        sync(device)
    except Exception as error:  # noqa: BLE001 - only OOM is swallowed, see below
        if not is_oom(error):
            raise
        ok = False
    seconds = time.perf_counter() - start
    if not ok:
        free_memory(device)
    return ok, seconds


def max_fitting(
    fits: Callable[[int], bool],
    known_fit: int,
    cap: int,
    granularity: int,
    report: Callable[[str], None] = log,
) -> dict[str, Any]:
    """The largest multiple of `granularity` in [known_fit, cap] for which `fits` holds.

    Doubles from `known_fit` until a probe fails (or `cap`), then bisects on multiples of
    `granularity`. Assumes monotonicity. Returns {"max": int, "probes": [[value, ok], ...],
    "capped": bool} where capped means `cap` itself fit.
    """
    probes: list[list[Any]] = []

    def probe(value: int) -> bool:
        ok = fits(value)
        probes.append([value, ok])
        report(f"    probe {value:>7d}: {'fits' if ok else 'OOM'}")
        return ok

    lo, hi = known_fit, None
    value = known_fit
    while hi is None:
        value = min(value * 2, cap)
        if value <= lo:
            break
        if probe(value):
            lo = value
            if value >= cap:
                break
        else:
            hi = value
    if hi is not None:
        while hi - lo > granularity:
            mid = lo + max(granularity, ((hi - lo) // 2) // granularity * granularity)
            if mid >= hi:
                break
            if probe(mid):
                lo = mid
            else:
                hi = mid
    return {"max": lo, "probes": probes, "capped": hi is None and lo >= cap}


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or math.isnan(numerator):
        return None
    return round(numerator / denominator, digits)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON via a temporary file and a rename (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in text]
    return "\n".join(lines)


def random_llama(config: dict[str, Any], device, dtype, seed: int):
    """A transformers LlamaForCausalLM built directly on `device` in `dtype`, in train mode, with our
    own init: weights ~ N(0, 0.02) from `seed`, norms 1 (identical for every variant, never zeros or
    uninitialised memory). `config` holds LlamaConfig fields."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(**{"attn_implementation": "sdpa", "use_cache": False, **config})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.02, generator=generator)
            else:
                parameter.fill_(1.0)
    return model.train()


def capture_step(step: Callable[[], Any], warmup: int = 3) -> Callable[[], Any]:
    """The whole training step as one CUDA graph: returns replay() -> the (static) loss tensor.

    Warm-up runs on a side stream (lazy inits, cuBLAS workspaces, PaCA's first column write),
    then one captured call. Gradients are set to None inside the step, so the captured backward
    allocates them from the graph's pool and every replay overwrites them (no accumulation).
    PaCA's resident columns: the captured forward includes the column rewrite (the last warm-up
    optimizer step left them stale), so each replay rewrites them from the current delta.
    """
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):  # on the warm-up stream, as the trainer's step does
        loss = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return loss.clone()

    replay.graph = graph  # keep the graph (and its memory pool) alive with the closure
    return replay


def parse_variants(parser, text: str, allowed: list[str]) -> list[str]:
    """A comma list of variant names, each checked against `allowed` (an argparse error otherwise)."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in allowed]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {allowed}")
    return variants


def package_versions(*names: str) -> dict[str, str | None]:
    """{"torch": ..., name: version or None when not installed} for the report."""
    import importlib

    import torch

    versions: dict[str, str | None] = {"torch": torch.__version__}
    for name in names:
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def device_dtype_out(args, name: str):
    """(device, dtype, out path) from a bench's --device/--dtype/--out/--tiny/--config arguments.

    bf16 on CUDA, fp32 elsewhere; CPU numbers never land in bench/results/ (they say nothing about
    the GPU targets), so without --out a CPU run writes /tmp/<name>_<config>.json.
    """
    import torch

    if args.tiny:
        torch.set_num_threads(1)  # a smoke test on a shared CPU: with a core taken, OpenMP threads spin for seconds
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    out = Path(
        args.out
        or (
            REPO_ROOT / "bench" / "results" / f"{name}.json"
            if device.type == "cuda"
            else f"/tmp/{name}_{args.config}.json"
        )
    )
    return device, dtype, out


class StepPhases:
    """Where an eager step's wall time goes, step by step: host time to *issue* each phase, GPU time
    to *run* it, Python GC pauses and caching-allocator events.

    A step is host-bound where a phase's host issue time reaches its GPU time (the GPU waited for
    launches); an allocator that maps or frees device memory mid-step (`num_device_alloc`,
    `num_device_free`, `num_alloc_retries`) synchronises the host with the GPU and shows up the same way.

        phases = StepPhases(device)
        phases.begin(); forward...; phases.mark("forward"); backward...; phases.mark("backward"); ...
        phases.end()       # synchronises; phases.steps holds one dict per step
    """

    ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")

    def __init__(self, device) -> None:
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.steps: list[dict[str, Any]] = []
        self._gc_started: float | None = None
        self._gc_ms = 0.0
        self._gc_collections: list[int] = [0, 0, 0]
        gc.callbacks.append(self._on_gc)

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self._gc_ms += (time.perf_counter() - self._gc_started) * 1e3
            self._gc_collections[info.get("generation", 0)] += 1
            self._gc_started = None

    def _allocator(self) -> dict[str, int]:
        if not self.is_cuda:
            return {}
        stats = self.torch.cuda.memory_stats(self.device)
        return {key: int(stats.get(key, 0)) for key in self.ALLOCATOR_COUNTERS}

    def _event(self):
        if not self.is_cuda:
            return None
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> None:
        sync(self.device)
        self._gc_ms, self._gc_collections = 0.0, [0, 0, 0]
        self._allocator_start = self._allocator()
        self._marks: list[tuple[str, float, Any]] = [("start", time.perf_counter(), self._event())]

    def mark(self, phase: str) -> None:
        self._marks.append((phase, time.perf_counter(), self._event()))

    def end(self) -> dict[str, Any]:
        issued = time.perf_counter()
        sync(self.device)
        done = time.perf_counter()
        record: dict[str, Any] = {
            "wall_ms": round((done - self._marks[0][1]) * 1e3, 3),
            "wait_after_issue_ms": round((done - issued) * 1e3, 3),
        }
        for (_, t0, e0), (phase, t1, e1) in zip(self._marks, self._marks[1:]):
            record[f"{phase}_host_ms"] = round((t1 - t0) * 1e3, 3)
            if e0 is not None:
                record[f"{phase}_gpu_ms"] = round(e0.elapsed_time(e1), 3)
        after = self._allocator()
        record.update({key: after[key] - self._allocator_start[key] for key in after})
        record["gc_ms"] = round(self._gc_ms, 3)
        record["gc_collections"] = list(self._gc_collections)
        self.steps.append(record)
        return record

    def summary(self) -> dict[str, Any]:
        """Medians of every field over the recorded steps, plus the raw per-step records."""
        keys = [k for k in self.steps[0] if k != "gc_collections"] if self.steps else []
        return {"median": {k: round(statistics.median(s[k] for s in self.steps), 3) for k in keys}, "steps": self.steps}


class MemoryTrace:
    """What is alive at the peak of allocated GPU memory, grouped by where it was allocated.

    Records the caching allocator's history (Python stacks) while the block runs, replays its
    alloc/free events to find the moment of the highest total, and groups the blocks alive then by
    the innermost Python frame outside torch itself. Slows every allocation down: time nothing
    inside it.

        with MemoryTrace(device) as trace:
            build, warm up, run two steps ...
        report["memory_at_peak"] = trace.breakdown()
    """

    def __init__(self, device, max_entries: int = 2_000_000) -> None:
        import torch

        self.torch, self.device, self.max_entries = torch, torch.device(device), max_entries
        self.snapshot: dict[str, Any] | None = None

    def __enter__(self) -> MemoryTrace:
        self.start_bytes = self.torch.cuda.memory_allocated(self.device)
        self.torch.cuda.memory._record_memory_history(max_entries=self.max_entries, stacks="python")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.snapshot = self.torch.cuda.memory._snapshot()
        self.torch.cuda.memory._record_memory_history(enabled=None)

    def breakdown(self, top: int = 30) -> dict[str, Any]:
        index = self.device.index if self.device.index is not None else self.torch.cuda.current_device()
        return peak_breakdown(self.snapshot["device_traces"][index], self.start_bytes, top)


def allocation_site(frames: list[dict[str, Any]]) -> str:
    """The innermost frame that is not torch's own Python (autograd, nn.Module plumbing, optimizers'
    internals are grouped under the user frame that called them), as 'path:line (function)'."""
    for frame in frames:
        filename = frame.get("filename", "")
        if "/torch/" not in filename and not filename.startswith("<"):
            short = filename.split("site-packages/")[-1].split(str(REPO_ROOT) + "/")[-1]
            return f"{short}:{frame.get('line')} ({frame.get('name')})"
    return "torch internals / no Python frame"


def peak_breakdown(events: list[dict[str, Any]], start_bytes: int, top: int = 30) -> dict[str, Any]:
    """Replay allocator events (torch.cuda.memory._snapshot()['device_traces'][i]) from `start_bytes`
    already allocated: the peak total, and the blocks alive at that moment grouped by allocation site.
    Blocks allocated before recording started count as 'before the trace' (freeing them lowers it)."""

    def replay(stop: int | None):
        """Alive blocks and pre-trace bytes after event `stop` (None: all); the peak and its event."""
        live: dict[int, tuple[int, list]] = {}
        before = current = peak = start_bytes
        peak_at = -1
        for position, event in enumerate(events if stop is None else events[: stop + 1]):
            action, address, size = event.get("action"), event.get("addr"), int(event.get("size", 0))
            if action == "alloc":
                live[address] = (size, event.get("frames", []))
                current += size
                if current > peak:
                    peak, peak_at = current, position
            elif action == "free_completed":
                if address in live:
                    current -= live.pop(address)[0]
                else:  # allocated before the trace started
                    before -= size
                    current -= size
        return live, before, peak, peak_at

    _, _, peak, peak_at = replay(None)  # first pass: when; second: what was alive then
    peak_live, peak_before, _, _ = replay(peak_at) if peak_at >= 0 else ({}, start_bytes, 0, -1)
    groups: dict[str, list[int]] = {}
    for size, frames in peak_live.values():
        entry = groups.setdefault(allocation_site(frames), [0, 0])
        entry[0] += size
        entry[1] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])
    mib = float(1 << 20)
    return {
        "peak_mib": round(peak / mib, 1),
        "before_trace_mib": round(peak_before / mib, 1),
        "peak_event": peak_at,
        "events": len(events),
        "sites": [
            {"site": site, "mib": round(total / mib, 2), "blocks": count} for site, (total, count) in ranked[:top]
        ],
        "other_sites_mib": round(sum(total for _, (total, _) in ranked[top:]) / mib, 2),
    }
