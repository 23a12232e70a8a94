"""Crash-safety harness: SIGKILL a tiny training run again and again, resume it, lose nothing.

    python bench/kill_resume.py --kills 20 --out bench/results/kill_resume.json   # ~3-4 min on 2 CPU cores
    python bench/kill_resume.py --kills 4 --steps 8                              # quick look

What it does:
1. trains the micro Stable Diffusion of tests/pipelines/micro_sd.py (LoRA r=4 on the UNet's attention,
   cosine LR, a checkpoint every step, a sample grid every 3 steps) straight through in a subprocess:
   the reference adapter;
2. trains the same run in a chain of subprocesses ("lives"), each resuming the run folder exactly as
   `studio train-* --resume` does (`Run.open` + `train_adapter`, which picks `latest_checkpoint`),
   and SIGKILLs each life at a seeded random point: a random time after start-up (which also lands in
   checkpoint loading), half-way through writing one checkpoint file, with a checkpoint's staging
   folder complete but not yet renamed, right after the rename, right after the checkpoint event is
   in logs/events.jsonl, half-way through run.json, and finally half-way through the final adapter and
   the final sample grid;
3. after every kill checks the run folder: every `checkpoints/step-*` folder loads completely
   (adapter, optimizer, scheduler, RNG: `load_checkpoint` into a fresh model) and holds the step its
   name says, `latest_checkpoint` names a complete one, and logs/events.jsonl has only whole lines;
4. at the end: the run is `finished`, no staging folder or temporary file is left anywhere in it, and
   the final adapter equals the reference bit for bit (CPU).

How a kill lands inside a write: the worker (this file with `--worker`) wraps `peft_core.io`'s
atomic write and two points of `pipelines.checkpoint.save_checkpoint`. Only at the one point the
parent armed (environment variable KILL_RESUME_AT = "<point>:<occurrence>") it prints `@armed` and
sleeps; the parent kills it on that line. Without the variable the worker runs unpatched code paths
unchanged (the wrappers only count). No hook lives in the library itself.

tests/reliability/test_kill_resume.py imports `run_harness` and runs a shorter chain.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MICRO_SD = REPO_ROOT / "tests" / "pipelines"
ADAPTER_NAME = "style"
SAMPLE_EVERY = 3

# Kill points inside a life, and how many occurrences of each a life reaches early (so a plan
# drawn for it fires before the run could finish). "tmpfile:<prefix>" = half-way through the
# atomic write of a file whose path relative to the run folder starts with <prefix>.
GENERAL_POINTS = {
    "time": None,  # a random delay after the worker is up (model built, before resume/training)
    "tmpfile:checkpoints/": 12,  # 6 files per checkpoint: adapter config+weights, optimizer x2, rng, state
    "staged": 2,  # staging folder complete, not yet renamed into place
    "renamed": 2,  # renamed, older checkpoints not yet pruned
    "event:checkpoint": 2,  # the checkpoint event is in logs/events.jsonl
    "tmpfile:run.json": 6,
    "tmpfile:samples/step": 1,  # a mid-run sample grid
}
END_POINTS = ["tmpfile:adapter/", "tmpfile:samples/final", "event:done"]


# -- the worker: one life of the training run ----------------------------------------------------
def worker(run_dir: Path, steps: int, seed: int) -> int:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(MICRO_SD))
    sys.path.insert(0, str(REPO_ROOT))
    from micro_sd import ColourDataset, micro_pipeline

    import peft_core.io as io
    import pipelines.checkpoint as checkpoint
    from peft_core import LoraConfig
    from pipelines.train import UNET_ATTENTION_TARGETS, TrainConfig, train_adapter
    from studio.runs import Run

    point, _, occurrence = os.environ.get("KILL_RESUME_AT", "").rpartition(":")
    target = int(occurrence) if point else 0
    counts: dict[str, int] = {}

    def reached(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1
        if name == point and counts[name] == target:
            print(f"@armed {name} #{target}", flush=True)
            time.sleep(600)  # the parent SIGKILLs us here

    original_write = io.atomic_write_bytes

    def atomic_write_bytes(path, data):  # the library's atomic write, with a pause half-way through
        absolute = Path(os.path.abspath(path))
        if not absolute.is_relative_to(run_dir.resolve()):
            return original_write(path, data)
        relative = absolute.relative_to(run_dir.resolve()).as_posix()
        names = [
            key
            for key in (*GENERAL_POINTS, *END_POINTS)
            if key.startswith("tmpfile:") and relative.startswith(key.split(":", 1)[1])
        ]
        if not any(name == point for name in names):
            for name in names:
                counts[name] = counts.get(name, 0) + 1
            return original_write(path, data)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        import tempfile

        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as file:
            file.write(data[: len(data) // 2])
            file.flush()
            os.fsync(file.fileno())
            for name in names:
                reached(name)
            file.write(data[len(data) // 2 :])
        os.replace(temporary, path)

    io.atomic_write_bytes = atomic_write_bytes
    original_json, original_fsync_dir = checkpoint.write_json, checkpoint._fsync_dir

    def write_json(path, data):
        original_json(path, data)
        if Path(path).name == "state.json":  # the last file of a staging folder
            reached("staged")

    def fsync_dir(path):
        original_fsync_dir(path)
        reached("renamed")

    checkpoint.write_json, checkpoint._fsync_dir = write_json, fsync_dir

    pipe = micro_pipeline(run_dir.parent / f".{run_dir.name}-tokenizer-{os.getpid()}")
    if (run_dir / "run.json").is_file():
        run = Run.open(run_dir)
    else:  # never started, or killed inside Run.create before run.json existed: start over
        shutil.rmtree(run_dir, ignore_errors=True)
        run = Run.create(run_dir.parent, run_dir.name, kind="kill-resume", config={"steps": steps, "seed": seed})
    train = TrainConfig(
        steps=steps,
        batch_size=2,
        learning_rate=5e-3,
        lr_schedule="cosine",
        seed=seed,
        checkpoint_every=1,
        sample_every=SAMPLE_EVERY,
        sample_prompts=["red"],
        sample_steps=1,
    )
    adapter = LoraConfig(targets=UNET_ATTENTION_TARGETS, r=4)

    def on_event(event):
        run.log_event(event)
        reached(f"event:{event.kind}")

    print("@ready", flush=True)
    if point == "time":
        print("@armed time", flush=True)
    train_adapter(pipe, ColourDataset(), adapter, train, run_dir, adapter_name=ADAPTER_NAME, on_event=on_event)
    run.update(status="finished")
    print("@finished", flush=True)
    return 0


# -- the parent -------------------------------------------------------------------------------------
def run_life(run_dir: Path, steps: int, seed: int, plan: str | None, delay: float | None) -> dict:
    """One subprocess; SIGKILLed at `plan` (and `delay` s after '@armed time'), or left to finish."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("KILL_RESUME_AT", None)
    if plan:
        env["KILL_RESUME_AT"] = plan
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--run-dir",
        str(run_dir),
        "--steps",
        str(steps),
        "--seed",
        str(seed),
    ]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    killed = False
    for line in process.stdout:
        if line.startswith("@armed"):
            if plan and plan.startswith("time"):
                time.sleep(delay or 0.0)
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                killed = True
            break
    process.stdout.close()
    stderr = process.stderr.read()
    process.wait()
    process.stderr.close()
    if killed and process.returncode == 0:  # the timed kill came after the run had finished
        killed = False
    if not killed and process.returncode != 0:
        raise RuntimeError(f"worker failed (exit {process.returncode}) with plan {plan}:\n{stderr[-4000:]}")
    return {
        "plan": plan,
        "delay_s": None if delay is None else round(delay, 3),
        "killed": killed,
        "returncode": process.returncode,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def leftovers(run_dir: Path) -> list[str]:
    """Staging folders and atomic-write temporaries anywhere in the run folder."""
    return sorted(
        p.relative_to(run_dir).as_posix()
        for p in run_dir.rglob("*")
        if p.name.endswith(".partial") or (p.name.startswith(".") and p.name.endswith(".tmp"))
    )


def check_run_folder(run_dir: Path, steps: int, seed: int) -> dict:
    """Every complete checkpoint loads and is what its name says; events.jsonl has whole lines only."""
    import torch

    sys.path.insert(0, str(MICRO_SD))
    from micro_sd import micro_pipeline

    from peft_core import LoraConfig, attach
    from peft_core.io import read_json
    from pipelines.checkpoint import CHECKPOINTS, latest_checkpoint, load_checkpoint
    from pipelines.train import UNET_ATTENTION_TARGETS, TrainConfig, make_lr_scheduler, make_optimizer

    folders = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*")) if (run_dir / CHECKPOINTS).is_dir() else []
    for folder in folders:
        unet = micro_pipeline(run_dir.parent / ".check-tokenizer").unet
        handle = attach(unet, LoraConfig(targets=UNET_ATTENTION_TARGETS, r=4), name=ADAPTER_NAME)
        train = TrainConfig(steps=steps, learning_rate=5e-3, lr_schedule="cosine", seed=seed)
        optimizer = make_optimizer(handle.trainable_parameters(), train, torch.device("cpu"))
        state = load_checkpoint(folder, handle, optimizer, make_lr_scheduler(optimizer, train))
        if f"step-{state['step']:08d}" != folder.name:
            raise AssertionError(f"{folder} holds step {state['step']}")
        if not optimizer.state:
            raise AssertionError(f"{folder}: the optimizer state is empty")
    latest = latest_checkpoint(run_dir)
    if folders and latest != folders[-1]:
        raise AssertionError(f"latest_checkpoint picked {latest}, not the newest complete {folders[-1]}")
    if latest is not None and latest.name.endswith(".partial"):
        raise AssertionError(f"latest_checkpoint picked a staging folder {latest}")
    events = run_dir / "logs" / "events.jsonl"
    lines = events.read_text().splitlines() if events.is_file() else []
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"{events} line {number} is torn: {line!r}") from None
    info = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    return {
        "checkpoints": [f.name for f in folders],
        "leftovers": leftovers(run_dir),
        "status": info.get("status"),
        "event_lines": len(lines),
    }


def adapter_tensors(run_dir: Path) -> dict:
    from peft_core.io import read_safetensors

    return read_safetensors(run_dir / "adapter" / ADAPTER_NAME / "adapter_model.safetensors")


def make_plans(kills: int, seed: int) -> list[tuple[str, float | None]]:
    """`kills` seeded kill points: general ones, then the end-of-run writes."""
    rng = random.Random(seed)
    ends = END_POINTS[: min(len(END_POINTS), max(0, kills - 1))]
    plans = []
    points = list(GENERAL_POINTS)  # every point in turn (seeded order), so 17 kills hit each at least twice
    order = [point for _ in range(kills // len(points) + 1) for point in rng.sample(points, len(points))]
    for point in order[: kills - len(ends)]:
        if point == "time":
            plans.append(("time:1", rng.uniform(0.0, 2.0)))
        else:
            plans.append((f"{point}:{rng.randint(1, GENERAL_POINTS[point])}", None))
    plans += [(f"{point}:1", None) for point in ends]
    return plans


def run_harness(
    workdir: Path,
    kills: int = 20,
    steps: int | None = None,
    seed: int = 0,
    log=print,
    plans: list[tuple[str, float | None]] | None = None,
) -> dict:
    """The whole experiment; returns the result record (and raises AssertionError on any loss).

    `plans`: explicit kill points ("<point>:<occurrence>", delay for "time:1") instead of `kills` seeded ones."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    torch.set_num_threads(1)
    steps = steps or 2 * kills + 4
    workdir = Path(workdir)
    started = time.perf_counter()

    reference_dir = workdir / "straight"
    reference = run_life(reference_dir, steps, seed, None, None)
    expected = adapter_tensors(reference_dir)
    log(f"uninterrupted run: {steps} steps in {reference['wall_s']} s")

    run_dir = workdir / "killed"
    lives, kill_count, leftovers_seen = [], 0, 0
    plans = plans or make_plans(kills, seed)
    kills = len(plans)
    for plan, delay in plans:
        life = run_life(run_dir, steps, seed, plan, delay)
        life.update(check_run_folder(run_dir, steps, seed) if run_dir.exists() else {})
        kill_count += life["killed"]
        leftovers_seen += bool(life.get("leftovers"))
        lives.append(life)
        log(
            f"life {len(lives):2d}: plan {plan:<24} killed={life['killed']!s:<5} {life['wall_s']:5.1f} s  "
            f"checkpoints={life.get('checkpoints')} leftovers={life.get('leftovers')}"
        )
        if not life["killed"]:
            break  # the run finished before this plan's point: nothing left to kill
    final = run_life(run_dir, steps, seed, None, None) if lives[-1]["killed"] else lives[-1]
    final_state = check_run_folder(run_dir, steps, seed)
    final.update(final_state)
    log(f"final life: {final['wall_s']} s, status {final_state['status']}, leftovers {final_state['leftovers']}")

    got = adapter_tensors(run_dir)
    mismatched = sorted(k for k in expected if k not in got or not torch.equal(got[k], expected[k]))
    mismatched += sorted(set(got) - set(expected))
    result = {
        "what": "micro SD (tests/pipelines/micro_sd.py), LoRA r=4 on UNet attention, cosine LR, checkpoint every step, "
        "sample grid every 3 steps; SIGKILL then resume (Run.open + train_adapter), CPU, 1 thread",
        "steps": steps,
        "seed": seed,
        "kills_planned": kills,
        "kills": kill_count,
        "lives": len(lives) + (final is not lives[-1]),
        "kills_with_leftovers_before_resume": leftovers_seen,
        "final_status": final_state["status"],
        "final_leftovers": final_state["leftovers"],
        "adapter_tensors": len(expected),
        "adapter_bit_exact": not mismatched,
        "mismatched_tensors": mismatched,
        "uninterrupted_wall_s": reference["wall_s"],
        "total_wall_s": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "lives_detail": lives + ([final] if final is not lives[-1] else []),
    }
    if mismatched:
        raise AssertionError(f"the resumed adapter differs from the uninterrupted one in {mismatched[:5]}")
    if final_state["status"] != "finished" or final_state["leftovers"]:
        raise AssertionError(f"run folder not clean at the end: {final_state}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default 20)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 2*kills+4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill plan and of the training run")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(Path(args.run_dir), args.steps, args.seed)

    import tempfile

    with tempfile.TemporaryDirectory(prefix="kill-resume-") as temporary:
        result = run_harness(Path(args.workdir or temporary), kills=args.kills, steps=args.steps, seed=args.seed)
    summary = {k: v for k, v in result.items() if k != "lives_detail"}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
