"""The job runner: studio commands in spawned workers, progress from the run folder, clean cancel, resume;
job records a restarted server reads back, and workers that never outlive their server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.train import STOP_FILE as PIPELINES_STOP_FILE
from studio.cli import main as studio_main
from studio.errors import UserError
from studio.runs import Run
from ui.jobs import STOP_FILE, JobManager, process_start
from ui.progress import events_of

TINY = [
    "--steps",
    "2",
    "--batch-size",
    "1",
    "--checkpoint-every",
    "1",
    "--targets",
    "to_q",
    "to_v",
    "--rank",
    "2",
    "--sample-prompts",
    "a star in neon style",
    "--sample-steps",
    "1",
]


@pytest.fixture
def manager(tmp_path):
    jobs = JobManager({"train": 1, "light": 1}, jobs_dir=tmp_path / "jobs", poll_s=0.05, stop_grace_s=60)
    yield jobs
    jobs.shutdown()


def layout(run_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(run_dir).as_posix()
        for p in run_dir.rglob("*")
        if p.name != "tensorboard" and "tensorboard" not in p.parts
    )


def test_stop_file_names_agree():
    assert STOP_FILE == PIPELINES_STOP_FILE


def test_a_job_makes_the_run_folder_the_cli_makes(tmp_path, manager):
    assert studio_main(["train-style", "--runs-dir", str(tmp_path / "cli"), "--name", "neon", *TINY]) == 0
    job = manager.submit(
        ["train-style", "--runs-dir", str(tmp_path / "ui"), "--name", "neon", *TINY],
        run_dir=tmp_path / "ui" / "neon",
        stoppable=True,
    )
    job = manager.wait(job.id, timeout=120)
    assert job.status == "finished", job.log_tail()
    cli, ui = tmp_path / "cli" / "neon", tmp_path / "ui" / "neon"
    assert layout(ui) == layout(cli)
    assert "adapter/style/adapter_model.safetensors" in layout(ui) and "samples/final.png" in layout(ui)
    assert Run.open(ui).config == Run.open(cli).config
    assert Run.open(ui).info["status"] == "finished" and Run.open(ui).info["step"] == 2
    ours, theirs = (load_file(d / "adapter" / "style" / "adapter_model.safetensors") for d in (ui, cli))
    # Same seeds; only the thread count differs between the worker and this process, which changes
    # float summation order (seen: 3e-5 on one element of 256 after two steps at lr 3e-3).
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-3, atol=1e-4)
    assert "adapter:" in job.log_tail()


def test_cancel_checkpoints_and_resume_finishes(tmp_path, manager):
    run_dir = tmp_path / "runs" / "cancel-me"
    argv = [
        "train-style",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--name",
        "cancel-me",
        "--steps",
        "8",
        "--batch-size",
        "1",
        "--checkpoint-every",
        "100",
        "--targets",
        "to_q",
        "to_v",
        "--rank",
        "2",
        "--sample-prompts",
        "a star in neon style",
        "--sample-steps",
        "1",
    ]
    job = manager.submit(argv, run_dir=run_dir, stoppable=True)
    deadline = time.monotonic() + 90
    while not ((run_dir / "run.json").is_file() and Run(run_dir).info.get("step", 0) >= 1):  # progress appears
        assert time.monotonic() < deadline and not manager.get(job.id).done, manager.get(job.id).log_tail()
        time.sleep(0.05)
    assert [e["step"] for e in events_of(run_dir) if e["kind"] == "step"][:1] == [1]
    manager.cancel(job.id)
    job = manager.wait(job.id, timeout=60)
    assert job.status == "interrupted" and job.returncode == 130, job.log_tail()
    info = Run(run_dir).info
    stopped_at = info["step"]
    assert info["status"] == "interrupted" and 1 <= stopped_at < 8
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert checkpoints[-1] == f"step-{stopped_at:08d}"  # although checkpoint_every is 100
    assert not (run_dir / "adapter").exists() and not (run_dir / STOP_FILE).exists()

    resumed = manager.submit(["train-style", "--resume", str(run_dir)], run_dir=run_dir, stoppable=True)
    resumed = manager.wait(resumed.id, timeout=120)
    assert resumed.status == "finished", resumed.log_tail()
    info = Run(run_dir).info
    assert info["status"] == "finished" and info["step"] == 8
    assert (run_dir / "adapter" / "style" / "adapter_model.safetensors").is_file()
    steps = [e["step"] for e in events_of(run_dir) if e["kind"] == "step"]
    assert steps == list(range(1, 9))  # the resumed job continued where the cancelled one stopped


def test_a_failing_command_reports_the_cli_error(tmp_path, manager):
    job = manager.submit(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "out")], lane="light")
    job = manager.wait(job.id, timeout=60)
    assert job.status == "failed" and job.returncode == 2
    assert "does not exist" in job.error


def test_queue_limits_and_cancelling_a_queued_job(tmp_path):
    jobs = JobManager({"train": 0, "light": 0}, jobs_dir=tmp_path / "jobs", max_queued=3, max_per_owner=2, poll_s=0.05)
    try:
        first = jobs.submit(["demo"], owner="alice", run_dir=tmp_path / "a")
        jobs.submit(["demo"], owner="alice")
        with pytest.raises(UserError, match="already have 2 jobs"):
            jobs.submit(["demo"], owner="alice")
        with pytest.raises(UserError, match="already queued or running"):
            jobs.submit(["demo"], owner="bob", run_dir=tmp_path / "a")
        jobs.submit(["demo"], owner="bob")
        with pytest.raises(UserError, match="queue is full"):
            jobs.submit(["demo"], owner="carol")
        with pytest.raises(UserError, match="unknown job lane"):
            jobs.submit(["demo"], lane="gpu")
        time.sleep(0.2)
        assert jobs.get(first.id).status == "queued"  # the lane's limit (0 here) holds it back
        assert jobs.cancel(first.id).status == "cancelled"
        jobs.submit(["demo"], owner="carol")  # a cancelled job frees its place
    finally:
        jobs.shutdown()


def record(jobs_dir: Path, job_id: str, **fields) -> None:
    data = {"id": job_id, "lane": "train", "argv": ["train-style"], "owner": "alice", "created": time.time()}
    (jobs_dir / f"{job_id}.json").write_text(json.dumps({**data, **fields}))


def finished_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_restarted_manager_reads_its_jobs_back_and_adopts_live_workers(tmp_path):
    """Jobs are records in the jobs folder: a restarted server settles the ones whose worker is gone
    from run.json, cancels the ones that never started, and adopts a worker that still runs (it is
    the run's writer: no second job on that run until it exits)."""
    jobs_dir, runs = tmp_path / "jobs", tmp_path / "runs"
    jobs_dir.mkdir()
    for name, status in (("lost", "running"), ("stopped", "interrupted"), ("alive", "running")):
        Run.create(runs, name, kind="train-style", config={}).update(status=status)
    record(jobs_dir, "queued", status="queued")
    record(jobs_dir, "lost", status="running", run_dir=str(runs / "lost"), pid=finished_pid())
    record(jobs_dir, "stopped", status="stopping", run_dir=str(runs / "stopped"), pid=finished_pid())
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        wait_until = time.monotonic() + 30
        while process_start(worker.pid) is None:  # /proc has it once the process runs
            assert time.monotonic() < wait_until
            time.sleep(0.05)
        record(jobs_dir, "alive", status="running", run_dir=str(runs / "alive"), pid=worker.pid)
        record(jobs_dir, "reused", status="running", pid=worker.pid, pid_start="1")  # a pid now someone else's
        jobs = JobManager({"train": 1, "light": 1}, jobs_dir=jobs_dir, poll_s=0.05, stop_grace_s=60)
        try:
            states = {job.id: job.status for job in jobs.jobs()}
            assert states == {
                "queued": "cancelled",
                "lost": "cancelled",
                "stopped": "interrupted",
                "alive": "stopping",
                "reused": "cancelled",
            }
            assert Run(runs / "lost").info["status"] == "cancelled"  # nothing writes it any more
            assert Run(runs / "alive").info["status"] == "running"  # its writer still runs: untouched
            assert jobs.latest(("train-style",), "alice").id == "alive" and jobs.latest(("train-style",), "bob") is None
            with pytest.raises(UserError, match="already queued or running"):  # never a second writer
                jobs.submit(["train-style", "--resume", str(runs / "alive")], run_dir=runs / "alive")
            jobs.cancel("alive")
            assert (runs / "alive" / STOP_FILE).exists()  # asked to stop like any job of this server
            worker.kill()
            worker.wait()
            assert jobs.wait("alive", timeout=30).status == "cancelled"
            assert json.loads((jobs_dir / "alive.json").read_text())["status"] == "cancelled"
            assert not (runs / "alive" / STOP_FILE).exists()
            jobs.submit(["demo"], lane="light", run_dir=runs / "alive")  # the run is free again
        finally:
            jobs.shutdown()
    finally:
        worker.kill()
        worker.wait()


def orphan(run_dir: Path, on_sigterm: str) -> int:
    """Start a "server" that starts a worker (only its watch on the server, given the server's pid as
    JobManager gives it) and dies at once; the worker's pid. `on_sigterm`: what the worker does then."""
    watcher = (
        "import signal, sys, time; from ui.jobs import _watch_server; "
        f"signal.signal(signal.SIGTERM, {on_sigterm}); "
        f"_watch_server(int(sys.argv[1]), {str(run_dir)!r}, 1.0, poll_s=0.05)"
    )
    server = (
        "import os, subprocess, sys; "
        f"child = subprocess.Popen([sys.executable, '-c', {watcher!r}, str(os.getpid())]); print(child.pid, flush=True)"
    )
    output = subprocess.run(
        [sys.executable, "-c", server], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
    )
    return int(output.stdout.split()[0])


def gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while process_start(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_worker_stops_and_exits_once_its_server_is_gone(tmp_path):
    """The worker's watch on its server: once the parent process is gone (here: it exits at once; in
    the browser test: SIGKILL), the worker sends itself SIGTERM, which the CLI turns into a checkpointed
    stop; a job that does not stop within the grace period is marked cancelled and the worker exits."""
    stubborn = Run.create(tmp_path / "runs", "stubborn", kind="train-style", config={})
    stubborn.release()  # Run.create made this test process the run's writer; the worker stands for it
    pid = orphan(stubborn.directory, "lambda *a: print('ignored', flush=True)")
    assert gone(pid), "the orphaned worker is still running"
    assert Run(stubborn.directory).info["status"] == "cancelled"
    quiet = Run.create(tmp_path / "runs", "quiet", kind="train-style", config={})
    quiet.release()
    pid = orphan(quiet.directory, "signal.SIG_DFL")  # SIGTERM ends it (a training: a clean stop)
    assert gone(pid, timeout=0.9 + 60) and Run(quiet.directory).info["status"] == "running"
