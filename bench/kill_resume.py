"""Crash-safety harness: SIGKILL a tiny training run again and again, resume it, lose nothing; then
SIGINT / SIGTERM a real `studio train-style` at random steps and check that no step before a signal is lost.

    python bench/kill_resume.py --kills 20 --signals 6 --out bench/results/kill_resume.json   # ~10 min, 2 cores
    python bench/kill_resume.py --kills 4 --steps 8 --signals 2                              # quick look

What it does:
1. trains the micro Stable Diffusion of tests/pipelines/micro_sd.py (LoRA r=4 on the UNet's attention,
   cosine LR, a checkpoint every step, a sample grid every 3 steps) straight through in a subprocess:
   the reference adapter;
2. trains the same run in a chain of subprocesses ("lives"), each resuming the run folder exactly as
   `studio train-* --resume` does (`Run.open` + `train_adapter`, which picks `latest_checkpoint`),
   and SIGKILLs each life at a seeded random point: a random time after start-up (which also lands in
   checkpoint loading), half-way through writing one checkpoint file, with a checkpoint's staging
   folder complete but not yet renamed, right after the rename, right after the checkpoint event is
   in logs/events.jsonl, half-way through run.json, half-way through deleting a pruned checkpoint, and
   finally half-way through the final adapter and the final sample grid. Some lives get SIGINTs instead,
   sent while a checkpoint file is half-written: one (the run stops after the next step's checkpoint),
   two (the write finishes, then the run stops), three (the write is abandoned);
3. after every kill checks the run folder: every `checkpoints/step-*` folder loads completely
   (adapter, optimizer, scheduler, RNG: `load_checkpoint` into a fresh model) and holds the step its
   name says, `latest_checkpoint` names a complete one, and logs/events.jsonl has only whole lines;
4. at the end: the run is `finished`, no staging folder or temporary file is left anywhere in it, and
   the final adapter equals the reference bit for bit (CPU);
5. the signal chain (`run_signal_harness`): the micro SD saved as a diffusers folder and its images as a
   folder of PNGs + captions, one uninterrupted `studio train-style` subprocess as the reference, and a
   chain of `studio train-style` (then `--resume`) subprocesses, each sent SIGINT or SIGTERM right after
   a seeded random step. Each must exit 130 / 143 saying "interrupted; resume with: ...", leave run.json
   `interrupted` and a checkpoint of the last step it reported (checkpoint_every is larger than the run:
   only the signals write checkpoints), and the next life must start right after it. The final adapter
   equals the reference bit for bit.

How a kill lands inside a write: the worker (this file with `--worker`) wraps `peft_core.io`'s
atomic write and three points of `pipelines.checkpoint.save_checkpoint` (staged, renamed, pruning).
Only at the one point the parent armed (environment variable KILL_RESUME_AT = "<point>:<occurrence>")
it prints `@armed` and sleeps; the parent kills it on that line (or, with KILL_RESUME_SIGNALS = n,
sends n SIGINTs, one per `@signal` acknowledgement). Without the variable the worker runs unpatched
code paths unchanged (the wrappers only count). No hook lives in the library itself. The worker trains
inside `Run.lifecycle`, as the CLI does: run lock, signals, status.

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
import types
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
    "pruning": 2,  # an old checkpoint renamed to .deleting-step-N and half deleted
}
# SIGINTs sent while a checkpoint file is half-written: "SIGINT*<n>@<point>:<occurrence>".
SIGNAL_PLANS = ["SIGINT*1@tmpfile:checkpoints/:3", "SIGINT*2@tmpfile:checkpoints/:4", "SIGINT*3@staged:1"]
END_POINTS = ["tmpfile:adapter/", "tmpfile:samples/final", "event:done"]


# -- the worker: one life of the training run ----------------------------------------------------
class KillPoints:
    """The kill points of one life: wrappers around the library's writes that count every point reached
    and stop at the armed one (KILL_RESUME_AT="<point>:<occurrence>"): sleep there for the parent's
    SIGKILL, or wait for its KILL_RESUME_SIGNALS SIGINTs."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.point, _, occurrence = os.environ.get("KILL_RESUME_AT", "").rpartition(":")
        self.target = int(occurrence) if self.point else 0
        self.signals = int(os.environ.get("KILL_RESUME_SIGNALS", "0"))
        self.counts: dict[str, int] = {}

    def reached(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        if name == self.point and self.counts[name] == self.target:
            print(f"@armed {name} #{self.target}", flush=True)
            if self.signals:
                wait_for_signals(self.signals)
            else:
                time.sleep(600)  # the parent SIGKILLs us here

    def armed_next(self, name: str) -> bool:
        """Whether the next occurrence of `name` is the armed one."""
        return name == self.point and self.counts.get(name, 0) + 1 == self.target

    def install(self) -> None:
        import peft_core.io as io
        import pipelines.checkpoint as checkpoint

        io.atomic_write_bytes = self._atomic_write(io.atomic_write_bytes)
        original_json, original_fsync_dir, original_rmtree = checkpoint.write_json, checkpoint._fsync_dir, shutil.rmtree

        def write_json(path, data):
            original_json(path, data)
            if Path(path).name == "state.json":  # the last file of a staging folder
                self.reached("staged")

        def fsync_dir(path):
            original_fsync_dir(path)
            self.reached("renamed")

        def rmtree(path, *args, **kwargs):  # a pruned checkpoint: renamed to .deleting-step-N, then deleted
            path = Path(path)
            if path.name.startswith(checkpoint.DELETING) and path.is_dir():
                if self.armed_next("pruning"):
                    for file in sorted(path.rglob("*.safetensors")):  # half-way through the deletion
                        file.unlink()
                self.reached("pruning")
            return original_rmtree(path, *args, **kwargs)

        checkpoint.write_json, checkpoint._fsync_dir = write_json, fsync_dir
        checkpoint.shutil = types.SimpleNamespace(**{**vars(shutil), "rmtree": rmtree})

    def _atomic_write(self, original_write):
        def atomic_write_bytes(path, data):  # the library's atomic write, with a pause half-way through
            absolute, root = Path(os.path.abspath(path)), self.run_dir.resolve()
            if not absolute.is_relative_to(root):
                return original_write(path, data)
            relative = absolute.relative_to(root).as_posix()
            names = [
                key
                for key in (*GENERAL_POINTS, *END_POINTS)
                if key.startswith("tmpfile:") and relative.startswith(key.split(":", 1)[1])
            ]
            if not any(name == self.point for name in names):
                for name in names:
                    self.counts[name] = self.counts.get(name, 0) + 1
                return original_write(path, data)
            return self._write_with_pause(Path(path), data, names)

        return atomic_write_bytes

    def _write_with_pause(self, path: Path, data: bytes, names: list[str]) -> None:
        import tempfile

        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as file:
            file.write(data[: len(data) // 2])
            file.flush()
            os.fsync(file.fileno())
            for name in names:
                self.reached(name)
            file.write(data[len(data) // 2 :])
        os.replace(temporary, path)


def worker(run_dir: Path, steps: int, seed: int) -> int:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(MICRO_SD))
    sys.path.insert(0, str(REPO_ROOT))
    from micro_sd import ColourDataset, micro_pipeline

    from peft_core import LoraConfig
    from pipelines.train import UNET_ATTENTION_TARGETS, TrainConfig, train_adapter
    from studio.runs import Run

    points = KillPoints(run_dir)
    points.install()
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
        points.reached(f"event:{event.kind}")

    print("@ready", flush=True)
    if points.point == "time":
        print("@armed time", flush=True)
    # As `studio train-* --resume` does: the run lock, SIGINT/SIGTERM as stop requests, run.json's status.
    with run.lifecycle(f"python bench/kill_resume.py --worker --run-dir {run_dir}") as outcome:
        train_adapter(pipe, ColourDataset(), adapter, train, run_dir, adapter_name=ADAPTER_NAME, on_event=on_event)
    if outcome.interrupted:
        return outcome.exit_code
    run.update(status="finished")
    run.release()
    print("@finished", flush=True)
    return 0


def wait_for_signals(count: int) -> None:
    """At the armed point: wait until the parent's `count` SIGINTs have come, acknowledging each but the
    last (`@signal <n>`: the parent sends the next one then; two at once would merge into one). A signal
    that stops the run at once raises KeyboardInterrupt out of this wait, as it would out of the write."""
    from pipelines.signals import SIGNALS

    acknowledged, deadline = 0, time.monotonic() + 120
    while SIGNALS.count < count and time.monotonic() < deadline:
        if SIGNALS.count > acknowledged:
            acknowledged = SIGNALS.count
            print(f"@signal {acknowledged}", flush=True)
        time.sleep(0.01)


# -- the parent -------------------------------------------------------------------------------------
def run_life(run_dir: Path, steps: int, seed: int, plan: str | None, delay: float | None) -> dict:
    """One subprocess; SIGKILLed at `plan` (and `delay` s after '@armed time'), or sent n SIGINTs there
    ("SIGINT*<n>@<point>:<occurrence>"), or left to finish."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("KILL_RESUME_AT", None)
    env.pop("KILL_RESUME_SIGNALS", None)
    signals = 0
    if plan and "@" in plan:
        signals = int(plan.split("@")[0].split("*")[1])
        env["KILL_RESUME_AT"], env["KILL_RESUME_SIGNALS"] = plan.split("@", 1)[1], str(signals)
    elif plan:
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
    killed, sent = False, 0
    for line in process.stdout:
        if line.startswith("@armed") and not signals:
            if plan and plan.startswith("time"):
                time.sleep(delay or 0.0)
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                killed = True
            break
        if line.startswith(("@armed", "@signal")) and signals and sent < signals:
            if sent:  # the next one once this one is acknowledged, and later than a repeat (pipelines.signals)
                time.sleep(0.6)
            os.kill(process.pid, signal.SIGINT)
            sent += 1
    process.stdout.read()
    process.stdout.close()
    stderr = process.stderr.read()
    process.wait()
    process.stderr.close()
    if killed and process.returncode == 0:  # the timed kill came after the run had finished
        killed = False
    if not killed and process.returncode not in ((0, 130) if sent else (0,)):
        raise RuntimeError(f"worker failed (exit {process.returncode}) with plan {plan}:\n{stderr[-4000:]}")
    if sent and process.returncode == 130 and "interrupted; resume with:" not in stderr:
        raise AssertionError(f"plan {plan}: no resume command on stderr:\n{stderr[-2000:]}")
    return {
        "plan": plan,
        "delay_s": None if delay is None else round(delay, 3),
        "killed": killed,
        "signals": sent,
        "returncode": process.returncode,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def leftovers(run_dir: Path) -> list[str]:
    """Staging folders and atomic-write temporaries anywhere in the run folder."""
    return sorted(
        p.relative_to(run_dir).as_posix()
        for p in run_dir.rglob("*")
        if p.name.endswith(".partial")
        or p.name.startswith(".deleting-")
        or (p.name.startswith(".") and p.name.endswith(".tmp"))
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
    from studio.runs import list_runs

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
    listed = [run for run in list_runs(run_dir.parent) if run["name"] == run_dir.name]
    return {
        "checkpoints": [f.name for f in folders],
        "leftovers": leftovers(run_dir),
        "status": info.get("status"),
        # what the runs list (and the UI) says: a killed run's "running" reads "interrupted" (no live writer)
        "listed_status": listed[0]["status"] if listed else None,
        "event_lines": len(lines),
    }


def adapter_tensors(run_dir: Path) -> dict:
    from peft_core.io import read_safetensors

    return read_safetensors(run_dir / "adapter" / ADAPTER_NAME / "adapter_model.safetensors")


def make_plans(kills: int, seed: int, signals: list[str] | tuple = ()) -> list[tuple[str, float | None]]:
    """`kills` seeded kill points: general ones, then the `signals` plans (SIGINTs inside a checkpoint
    write, see SIGNAL_PLANS), then the end-of-run writes."""
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
    plans += [(plan, None) for plan in signals]
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
    """The kill chain; returns the result record (and raises AssertionError on any loss).

    `plans`: explicit kill points ("<point>:<occurrence>", delay for "time:1", or SIGINTs inside a write:
    "SIGINT*<n>@<point>:<occurrence>") instead of `kills` seeded ones (and SIGNAL_PLANS)."""
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
    plans = plans or make_plans(kills, seed, SIGNAL_PLANS)
    kills = sum("@" not in plan for plan, _ in plans)
    for plan, delay in plans:
        life = run_life(run_dir, steps, seed, plan, delay)
        life.update(check_run_folder(run_dir, steps, seed) if run_dir.exists() else {})
        kill_count += life["killed"]
        leftovers_seen += bool(life.get("leftovers"))
        lives.append(life)
        log(
            f"life {len(lives):2d}: plan {plan:<32} exit {life['returncode']!s:>4} {life['wall_s']:5.1f} s  "
            f"checkpoints={life.get('checkpoints')} leftovers={life.get('leftovers')} "
            f"status={life.get('status')} listed={life.get('listed_status')}"
        )
        if life["returncode"] == 0 or life.get("status") == "finished":
            break  # the run finished before this plan's point (or the timed kill): nothing left to kill
        if life.get("listed_status") != "interrupted":
            raise AssertionError(f"after plan {plan} the runs list says {life.get('listed_status')!r}, not interrupted")
    final = run_life(run_dir, steps, seed, None, None) if lives[-1]["returncode"] != 0 else lives[-1]
    final_state = check_run_folder(run_dir, steps, seed)
    final.update(final_state)
    log(f"final life: {final['wall_s']} s, status {final_state['status']}, leftovers {final_state['leftovers']}")

    got = adapter_tensors(run_dir)
    mismatched = sorted(k for k in expected if k not in got or not torch.equal(got[k], expected[k]))
    mismatched += sorted(set(got) - set(expected))
    result = {
        "what": "micro SD (tests/pipelines/micro_sd.py), LoRA r=4 on UNet attention, cosine LR, checkpoint every step, "
        "sample grid every 3 steps; SIGKILL (or SIGINTs inside a checkpoint write) then resume (Run.open + "
        "Run.lifecycle + train_adapter), CPU, 1 thread",
        "steps": steps,
        "seed": seed,
        "kills_planned": kills,
        "kills": kill_count,
        "signal_lives": sum(bool(life["signals"]) for life in lives),
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
    if final_state["status"] != "finished" or final_state["leftovers"] or (run_dir / "run.lock").exists():
        raise AssertionError(f"run folder not clean at the end: {final_state}")
    return result


# -- the signal chain: SIGINT / SIGTERM to a real `studio train-style` ---------------------------------
def make_cli_inputs(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """The micro SD as a diffusers folder and its colour squares as a folder of PNGs with captions."""
    import torch
    from PIL import Image

    sys.path.insert(0, str(MICRO_SD))
    from micro_sd import ColourDataset, micro_pipeline

    base, data = folder / "micro-sd", folder / "images"
    micro_pipeline(folder / ".tokenizer", seed=seed).save_pretrained(base, safe_serialization=True)
    data.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(ColourDataset()):
        pixels = ((item["pixel_values"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        Image.fromarray(pixels.numpy()).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text(item["prompt"])
    return base, data


def studio_command(base: Path, data: Path, runs: Path, name: str, steps: int, seed: int) -> list[str]:
    """`studio train-style` on the micro inputs; checkpoint_every above the run: only signals checkpoint."""
    return [
        *(sys.executable, "-m", "studio.cli", "train-style", str(data), "--base", str(base)),
        *("--runs-dir", str(runs), "--name", name, "--steps", str(steps), "--seed", str(seed)),
        *("--batch-size", "2", "--rank", "4", "--checkpoint-every", str(steps + 100), "--sample-steps", "1"),
    ]


def step_events(run_dir: Path) -> list[int]:
    events = run_dir / "logs" / "events.jsonl"
    if not events.is_file():
        return []
    lines = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    return [line["step"] for line in lines if line.get("kind") == "step"]


def run_cli_life(command: list[str], run_dir: Path, log_path: Path, plan: tuple[str, int] | None) -> dict:
    """One `studio` subprocess; sent `plan` = (signal name, step) right after it reports that step (or a
    later one: the parent polls logs/events.jsonl), or left to finish."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    before = len(step_events(run_dir))
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        sent_after = None
        while plan and process.poll() is None and sent_after is None:
            mine = step_events(run_dir)[before:]
            if mine and mine[-1] >= plan[1]:
                process.send_signal(getattr(signal, plan[0]))
                sent_after = mine[-1]
            time.sleep(0.005)
        process.wait(timeout=600)
    steps = step_events(run_dir)[before:]
    return {
        "plan": None if plan is None else f"{plan[0]} after step {plan[1]}",
        "signal_after_step": sent_after if plan else None,
        "returncode": process.returncode,
        "first_step": steps[0] if steps else None,
        "last_step": steps[-1] if steps else None,
        "output": log_path.read_text(errors="replace"),
        "wall_s": round(time.perf_counter() - started, 2),
    }


def check_interrupted_life(life: dict, run_dir: Path, plan: tuple[str, int]) -> None:
    """A signalled life: exit 128 + signal, the resume command on stderr, run.json interrupted, the lock
    released, and a checkpoint of the last step it reported (no step before the signal lost)."""
    from peft_core.io import read_json
    from pipelines.checkpoint import latest_checkpoint

    expected_code = 128 + getattr(signal, plan[0])
    resume = f"interrupted; resume with: studio train-style --resume {run_dir}"
    if life["returncode"] != expected_code or resume not in life["output"]:
        raise AssertionError(f"{plan}: exit {life['returncode']}, output:\n{life['output'][-3000:]}")
    status = read_json(run_dir / "run.json")["status"]
    checkpoint = latest_checkpoint(run_dir)
    life["checkpoint_step"] = read_json(checkpoint / "state.json")["step"] if checkpoint else 0
    life["status"] = status
    if status != "interrupted" or (run_dir / "run.lock").exists():
        raise AssertionError(f"{plan}: run.json says {status!r} (or the run lock was left behind)")
    if life["checkpoint_step"] != life["last_step"] or life["checkpoint_step"] < life["signal_after_step"]:
        raise AssertionError(
            f"{plan}: signalled after step {life['signal_after_step']}, reported step {life['last_step']}, "
            f"but the newest checkpoint is step {life['checkpoint_step']}: steps before the signal were lost"
        )


def make_signal_plans(count: int, steps: int, seed: int) -> list[tuple[str, int]]:
    """`count` (signal, step) pairs, SIGINT and SIGTERM in turn, at seeded increasing steps, each life
    training 1-3 steps and the last leaving at least 2 steps to the final life."""
    rng = random.Random(seed)
    plans, at = [], 0
    for index in range(count):
        at = min(at + rng.randint(1, 3), steps - 2 - (count - 1 - index))
        plans.append(("SIGINT" if index % 2 == 0 else "SIGTERM", at))
    return plans


def run_signal_harness(
    workdir: Path, signals: int = 2, steps: int = 10, seed: int = 0, log=print, plans: list | None = None
) -> dict:
    """The signal chain (see the module docstring); returns its record, raises AssertionError on a loss."""
    import torch

    from peft_core.io import read_safetensors

    workdir = Path(workdir)
    started = time.perf_counter()
    base, data = make_cli_inputs(workdir / "inputs", seed)
    runs = workdir / "cli-runs"
    plans = plans or make_signal_plans(signals, steps, seed)
    # The reference trains beside the chain's first life (two processes on two cores).
    reference_log = workdir / "straight.log"
    with open(reference_log, "w") as reference_output:
        reference = subprocess.Popen(
            studio_command(base, data, runs, "straight", steps, seed),
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
            stdout=reference_output,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        run_dir, lives = runs / "signalled", []
        command = studio_command(base, data, runs, "signalled", steps, seed)
        for plan in [*plans, None]:
            life = run_cli_life(command, run_dir, workdir / f"life-{len(lives) + 1}.log", plan)
            if lives and life["first_step"] is not None and life["first_step"] != lives[-1]["checkpoint_step"] + 1:
                raise AssertionError(
                    f"life {len(lives) + 1} started at step {life['first_step']}, not after "
                    f"the checkpoint of step {lives[-1]['checkpoint_step']}"
                )
            lives.append(life)
            if plan is not None and life["returncode"] != 0:
                check_interrupted_life(life, run_dir, plan)
            log(
                f"signal life {len(lives)}: {life['plan']}: exit {life['returncode']}, steps {life['first_step']}.."
                f"{life['last_step']}, checkpoint {life.get('checkpoint_step')}, {life['wall_s']} s"
            )
            if life["returncode"] == 0:
                break
            command = [sys.executable, "-m", "studio.cli", "train-style", "--resume", str(run_dir)]
        reference.wait(timeout=600)
    if reference.returncode != 0 or lives[-1]["returncode"] != 0:
        raise AssertionError(
            f"a run did not finish:\n{reference_log.read_text()[-2000:]}\n{lives[-1]['output'][-2000:]}"
        )
    expected = read_safetensors(runs / "straight" / "adapter" / "style" / "adapter_model.safetensors")
    got = read_safetensors(run_dir / "adapter" / "style" / "adapter_model.safetensors")
    mismatched = sorted(k for k in expected if k not in got or not torch.equal(got[k], expected[k]))
    mismatched += sorted(set(got) - set(expected))
    result = {
        "what": "micro SD as a diffusers folder, `studio train-style` subprocesses (LoRA r=4 on the default "
        "targets, checkpoint_every > steps), SIGINT / SIGTERM after seeded random steps, then --resume; CPU",
        "steps": steps,
        "signals_sent": sum(life["signal_after_step"] is not None for life in lives),
        "lives": len(lives),
        "exit_codes": [life["returncode"] for life in lives],
        "adapter_tensors": len(expected),
        "adapter_bit_exact": not mismatched,
        "mismatched_tensors": mismatched,
        "final_leftovers": leftovers(run_dir),
        "total_wall_s": round(time.perf_counter() - started, 1),
        "lives_detail": [{k: v for k, v in life.items() if k != "output"} for life in lives],
    }
    if mismatched:
        raise AssertionError(f"the signalled run's adapter differs from the uninterrupted one in {mismatched[:5]}")
    if result["final_leftovers"] or (run_dir / "run.lock").exists():
        raise AssertionError(f"run folder not clean at the end: {result['final_leftovers']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default 20)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 2*kills+4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill plan and of the training run")
    parser.add_argument(
        "--signals", type=int, default=6, help="SIGINT/SIGTERMs sent to `studio train-style` (default 6)"
    )
    parser.add_argument(
        "--signal-steps", type=int, default=None, help="steps of the signal chain (default 3*signals+6)"
    )
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(Path(args.run_dir), args.steps, args.seed)

    import tempfile

    with tempfile.TemporaryDirectory(prefix="kill-resume-") as temporary:
        workdir = Path(args.workdir or temporary)
        result = run_harness(workdir / "kills", kills=args.kills, steps=args.steps, seed=args.seed)
        if args.signals:
            steps = args.signal_steps or 3 * args.signals + 6
            result["signals"] = run_signal_harness(workdir / "signals", args.signals, steps, seed=args.seed)
    summary = {k: v for k, v in result.items() if k != "lives_detail"}
    if "signals" in summary:
        summary["signals"] = {k: v for k, v in summary["signals"].items() if k != "lives_detail"}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
