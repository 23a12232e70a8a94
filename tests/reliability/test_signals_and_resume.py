"""Signals, resume rules and the run lock (issue 26): the unit-level half of tests/reliability.

- SIGINT / SIGTERM under the kit's handlers: the step in progress is finished and checkpointed; a second
  signal during a checkpoint write lets it finish; a third abandons it; outside a step loop, at once.
- the lifecycle: exit 130 / 143, "interrupted; resume with: ...", run.json `interrupted`, lock released;
- checkpoints: a damaged newest checkpoint is skipped for the newest intact one; pruning renames first;
- the run lock: a second writer is refused by name, a dead holder's lock is taken over, a killed run's
  "running" reads "interrupted" in the runs list;
- flags given with --resume apply (a short list) or are refused by name.
The subprocess chains (SIGKILL anywhere, signals to a real `studio train-style`) are test_kill_resume.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from peft_core import LoraConfig, attach
from pipelines.checkpoint import checkpoint_problem, latest_checkpoint, remove_partial_writes, save_checkpoint
from pipelines.errors import UserError
from pipelines.signals import SIGNALS, catch_stop_signals
from pipelines.training import STOP_FILE, StopRequested, TrainEvent, in_step_loop
from studio.cli import main
from studio.runs import Run, list_runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from micro_sd import ColourDataset, micro_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def signals_count_at_once(monkeypatch):
    """These tests send their signals 50 ms apart: no repeat window (see the test of it)."""
    monkeypatch.setattr("pipelines.signals.REPEAT_S", 0.0)


def send(signum: int) -> None:
    """A signal to this process; its Python handler runs during the short sleep (and may raise there)."""
    os.kill(os.getpid(), signum)
    time.sleep(0.05)


# -- the kit's signal handling ----------------------------------------------------------------------
def test_signal_outside_a_step_loop_stops_at_once_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), catch_stop_signals(verbose=False) as signals:  # loading, setup
        send(signal.SIGTERM)
    assert signals.name == "SIGTERM"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert not SIGNALS.stop_wanted()  # no handlers: an old signal is no stop request for a later run


def test_signals_in_a_step_loop_and_during_a_checkpoint_write():
    with catch_stop_signals(verbose=False) as signals:
        in_step_loop(True)
        send(signal.SIGINT)  # first: a stop request, read by stop_requested after the step
        assert signals.received == signal.SIGINT and signals.stop_wanted()
        with pytest.raises(KeyboardInterrupt), signals.writing():  # second, during a checkpoint write:
            send(signal.SIGINT)  # the write finishes first, then the run stops
            finished_the_write = True
        assert finished_the_write
    with catch_stop_signals(verbose=False) as signals:
        in_step_loop(True)
        send(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt), signals.writing():
            send(signal.SIGINT)
            send(signal.SIGINT)  # third: the write is abandoned (its staging folder stays for the next start)
            pytest.fail("the third signal did not stop the write")
    with catch_stop_signals(verbose=False) as signals:
        in_step_loop(True)
        send(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # second, outside a write: at once
            send(signal.SIGINT)


def test_a_signal_repeated_within_half_a_second_counts_once(monkeypatch):
    monkeypatch.setattr("pipelines.signals.REPEAT_S", 0.5)
    with catch_stop_signals(verbose=False) as signals:
        in_step_loop(True)
        send(signal.SIGINT)
        send(signal.SIGINT)  # e.g. torchrun forwarding the terminal's Ctrl-C to its workers: no "at once"
        assert signals.count == 1
        time.sleep(0.5)
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)


def train(tmp_path: Path, run_dir: Path, steps: int, on_event=None):
    from pipelines.train import UNET_ATTENTION_TARGETS, TrainConfig, train_adapter

    config = TrainConfig(steps=steps, batch_size=2, learning_rate=5e-3, checkpoint_every=100, lr_schedule="cosine")
    pipe = micro_pipeline(tmp_path / f"tokenizer-{time.monotonic_ns()}")
    lora = LoraConfig(targets=UNET_ATTENTION_TARGETS, r=4)
    return train_adapter(pipe, ColourDataset(), lora, config, run_dir, on_event=on_event)


def test_sigint_in_training_checkpoints_the_step_it_came_after(tmp_path):
    run = tmp_path / "run"

    def interrupt_after_three(event):
        if event.kind == "step" and event.step == 3:
            send(signal.SIGINT)

    with pytest.raises(StopRequested, match="stopped by SIGINT after step 3 of 6"), catch_stop_signals(False):
        train(tmp_path, run, 6, interrupt_after_three)
    assert latest_checkpoint(run).name == "step-00000003"  # although checkpoint_every is 100


def test_a_second_sigint_while_the_checkpoint_is_written_lets_it_finish(tmp_path, monkeypatch):
    import pipelines.checkpoint as checkpoint

    run, original, signals_at_state = tmp_path / "run", checkpoint.write_json, []

    def write_json(path, data):  # the checkpoint's last file: a signal arrives while it is written
        if Path(path).name == "state.json" and signals_at_state:
            for _ in range(signals_at_state.pop()):
                send(signal.SIGINT)
        original(path, data)

    def interrupt_after_two(event):
        if event.kind == "step" and event.step == 2:
            send(signal.SIGINT)
            signals_at_state.append(1)

    monkeypatch.setattr(checkpoint, "write_json", write_json)
    with pytest.raises(KeyboardInterrupt) as stopped, catch_stop_signals(False):
        train(tmp_path, run, 5, interrupt_after_two)
    assert not isinstance(stopped.value, StopRequested)  # stopped at once, but only after the write
    assert latest_checkpoint(run).name == "step-00000002" and checkpoint_problem(latest_checkpoint(run)) is None

    # Two more during the write: the third abandons it; a staging folder stays, the next start removes it.
    abandoned = tmp_path / "abandoned"

    def interrupt_twice_in_the_write(event):
        if event.kind == "step" and event.step == 2:
            send(signal.SIGINT)
            signals_at_state.append(2)

    with pytest.raises(KeyboardInterrupt), catch_stop_signals(False):
        train(tmp_path, abandoned, 5, interrupt_twice_in_the_write)
    assert latest_checkpoint(abandoned) is None
    assert [p.name for p in (abandoned / "checkpoints").iterdir()] == [".step-00000002.partial"]
    assert remove_partial_writes(abandoned) and not list((abandoned / "checkpoints").iterdir())


# -- the lifecycle --------------------------------------------------------------------------------
def test_lifecycle_exit_codes_messages_status_and_lock(tmp_path, capsys):
    run = Run.create(tmp_path, "r", kind="train-style", config={})
    run.update(status="failed", error="OSError: old")
    (run.directory / STOP_FILE).touch()  # a stale request
    (run.directory / "checkpoints" / ".step-00000001.partial").mkdir(parents=True)  # a killed write
    with run.lifecycle("studio train-style --resume R") as outcome:
        assert run.info["status"] == "running" and run.info["error"] is None
        assert not (run.directory / STOP_FILE).exists() and not list((run.directory / "checkpoints").iterdir())
        assert run.holder()["pid"] == os.getpid()
        raise StopRequested("stopped on request after step 2 of 5; the checkpoint resumes it")
    assert outcome.interrupted and outcome.exit_code == 130
    assert run.info["status"] == "interrupted" and run.holder() is None and not (run.directory / "run.lock").exists()
    err = capsys.readouterr().err
    assert (
        "stopped on request after step 2 of 5" in err
        and "interrupted; resume with: studio train-style --resume R" in err
    )

    with run.lifecycle("studio train-style --resume R") as outcome:
        in_step_loop(False)  # e.g. loading: a signal stops at once
        send(signal.SIGTERM)
    assert outcome.exit_code == 143 and run.info["status"] == "interrupted"
    assert "stopped at once by SIGTERM" in capsys.readouterr().err


# -- checkpoints ----------------------------------------------------------------------------------
def tiny_checkpoints(run_dir: Path, steps: list[int], keep: int = 2) -> list[Path]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    handle = attach(model, LoraConfig(targets=["0"], r=2), name="a")
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return [save_checkpoint(run_dir, step, handle, ["a"], optimizer, keep=keep) for step in steps]


@pytest.mark.parametrize(
    "damage",
    [
        ("adapter/a/adapter_model.safetensors", lambda b: b[: len(b) // 2]),  # truncated copy
        ("optimizer.safetensors", lambda b: b[:5]),  # cut inside the header length
        ("optimizer.json", lambda b: b[:-7]),  # broken JSON
        ("state.json", lambda b: b"{"),
        ("rng.safetensors", None),  # missing
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, damage):
    first, second = tiny_checkpoints(tmp_path, [1, 2])
    name, cut = damage
    if cut is None:
        (second / name).unlink()
    else:
        (second / name).write_bytes(cut((second / name).read_bytes()))
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint.*step-00000002.*resuming from step-00000001"):
        assert latest_checkpoint(tmp_path) == first
    assert checkpoint_problem(first) is None and name.split("/")[-1] in checkpoint_problem(second)
    (first / "rng.safetensors").write_bytes(b"")
    with pytest.warns(UserWarning, match="no intact checkpoint is left: the run starts again from step 0"):
        assert latest_checkpoint(tmp_path) is None


def test_pruning_renames_a_checkpoint_away_before_deleting_it(tmp_path):
    paths = tiny_checkpoints(tmp_path, [1, 2, 3])
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"] and not paths[0].exists()
    (root / ".deleting-step-00000002").mkdir()  # as a kill half-way through deleting it leaves it
    (root / ".deleting-step-00000002" / "rng.safetensors").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == paths[2]
    assert [p.name for p in remove_partial_writes(tmp_path)] == [".deleting-step-00000002"]


# -- the run lock ---------------------------------------------------------------------------------
def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run's lock (it prints 'held' once it does)."""
    code = f"from studio import run_lock; run_lock.acquire({str(run_dir)!r}); print('held', flush=True); input()"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"held"
    return process


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    run = Run.create(tmp_path, "r", kind="train-style", config={})
    run.release()
    other = hold_lock(run.directory)
    try:
        with pytest.raises(UserError, match=rf"is being written by process {other.pid} on .*; one process at a"):
            run.acquire()
        assert main(["train-style", "--resume", str(run.directory)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()  # one line, no traceback
        assert line.startswith(f"error: {run.directory} is being written by process {other.pid}")
        assert [r["status"] for r in list_runs(tmp_path)] == ["running"]  # a live writer
    finally:
        other.kill()  # SIGKILL: the lock file stays, naming a dead process
        other.wait()
    assert json.loads((run.directory / "run.lock").read_text())["pid"] == other.pid
    assert run.holder() is None
    (listed,) = list_runs(tmp_path)  # run.json still says running; nobody writes it: interrupted
    assert listed["status"] == "interrupted" and listed["process_gone"] and run.info["status"] == "running"
    run.acquire()  # taken over
    assert run.holder()["pid"] == os.getpid() and list_runs(tmp_path)[0]["status"] == "running"
    run.release()


def test_a_lock_naming_a_reused_pid_is_taken_over(tmp_path):
    run = Run.create(tmp_path, "r", kind="train-style", config={})
    run.release()
    record = {"pid": os.getppid(), "started": "another-boot:1", "host": socket.gethostname(), "since": 0}
    (run.directory / "run.lock").write_text(json.dumps(record))  # a live PID, but not the process that locked
    assert run.holder() is None
    run.acquire()
    assert run.holder()["pid"] == os.getpid()
    run.release()


# -- flags given with --resume ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step train-style run on the micro SD (as a diffusers folder), finished."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kill_resume", REPO / "bench" / "kill_resume.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    folder = tmp_path_factory.mktemp("resume-flags")
    base, data = harness.make_cli_inputs(folder)
    command = harness.studio_command(base, data, folder / "runs", "r", 2, 0)[3:]  # from "train-style" on
    assert main([*command, "--checkpoint-every", "1"]) == 0
    return folder / "runs" / "r"


@pytest.mark.parametrize(
    "argv, refused",
    [
        (["--learning-rate", "0.1"], "--learning-rate cannot change on --resume"),
        (["--rank", "8", "--lr-schedule", "linear"], "--rank, --lr-schedule cannot change on --resume"),
        (["elsewhere"], "DATA cannot change on --resume"),
        (["--name", "x"], "--name cannot change on --resume"),
        (["--steps", "1"], "--steps 1 is below step 2, which this run has already reached; pass --steps 2 or more"),
    ],
)
def test_flags_that_cannot_change_on_resume_are_refused_by_name(finished_run, capsys, argv, refused):
    before = (finished_run / "config.yaml").read_text()
    assert main(["train-style", "--resume", str(finished_run), *argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert refused in line
    if "cannot change" in refused:
        assert "flags --resume takes: --steps, --checkpoint-every, --sample-every, --device" in line
    assert (finished_run / "config.yaml").read_text() == before and finished_run.joinpath("run.json").is_file()


def test_config_file_and_other_commands_refuse_too(finished_run, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train: {steps: 5}\n")
    assert main(["train-style", "--resume", str(finished_run), "--config", str(tmp_path / "c.yaml")]) == 2
    assert "--config cannot change on --resume" in capsys.readouterr().err
    b4m = Run.create(tmp_path, "b4m", kind="break-for-make", config={})
    b4m.release()
    assert main(["break-for-make", "--resume", str(b4m.directory), "--rank", "8"]) == 2
    assert "--rank cannot change on --resume" in capsys.readouterr().err
    from studio.llm import LlmJob, job_record

    llm = Run.create(tmp_path, "llm", kind="train-llm", config=job_record(LlmJob(adapter=LoraConfig(targets=["q"]))))
    llm.release()
    assert main(["train-llm", "--resume", str(llm.directory), "--learning-rate", "1"]) == 2
    err = capsys.readouterr().err
    assert (
        "--learning-rate cannot change on --resume" in err and "--steps, --checkpoint-every, --eval-every, --cpu" in err
    )


def test_steps_and_checkpoint_every_apply_on_resume_and_are_kept(finished_run, capsys):
    run = Run.open(finished_run)
    run.update(error="OSError: an old failure")
    assert main(["train-style", "--resume", str(finished_run), "--steps", "4", "--checkpoint-every", "3"]) == 0
    assert run.info["status"] == "finished" and run.info["step"] == 4 and run.info["error"] is None
    train = yaml.safe_load((finished_run / "config.yaml").read_text())["train"]
    assert train["steps"] == 4 and train["checkpoint_every"] == 3  # a later --resume keeps them
    steps = [json.loads(line) for line in (finished_run / "logs" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in steps if e["kind"] == "step"] == [1, 2, 3, 4]  # trained on from step 2
    assert [e["step"] for e in steps if e["kind"] == "checkpoint"] == [1, 2, 3, 4]  # 3 (every 3) and 4 (the end)


# -- progress -------------------------------------------------------------------------------------------
def test_the_progress_bar_eta_counts_this_process_steps_after_a_resume():
    from studio.progress import ProgressPrinter

    printer = ProgressPrinter(300)
    time.sleep(0.3)  # loading
    for step in range(201, 205):  # a resume from step 200, 0.1 s a step: about 10 s left for 96 steps
        time.sleep(0.1)
        printer(TrainEvent("step", step, 300, loss=1.0, lr=1e-3))
    minutes, seconds = re.search(r"<(\d+):(\d+)", str(printer.bar)).groups()
    printer.close()
    assert 5 <= int(minutes) * 60 + int(seconds) <= 30  # the old bar said ~00:00 (it counted 204 steps)
