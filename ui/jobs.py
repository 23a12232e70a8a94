"""Jobs: `studio` commands run in worker processes, never in the web server's request threads.

    manager = JobManager(Workspace("studio-workspace"), limits={"train": 1, "light": 1})
    job = manager.submit(["train-style", data, "--runs-dir", ws.runs, "--name", name, "--steps", "50"],
                         lane="train", run_dir=ws.runs / name, stoppable=True)
    manager.cancel(job.id)        # a clean stop: checkpoint, run.json "interrupted", resumable
    manager.submit(["train-style", "--resume", str(job.run_dir)], lane="train", run_dir=job.run_dir, stoppable=True)

A job is exactly a `studio ...` command line: the worker (a fresh 'spawn' process) calls
`studio.cli.main(argv)`, so a job's run folder is what the CLI would have made, and the UI can
show the user the command it runs. Progress is read from the run folder (run.json,
logs/events.jsonl), which the CLI writes anyway; the worker's stdout/stderr go to
`<workspace>/jobs/<id>.log`.

Lanes keep a long training from blocking a quick generation: each lane has its own concurrency
limit, and the manager bounds queued jobs in total and per owner (a browser session), so one user
cannot fill the queue.

Cancel: a training job that supports it (train-style / train-content / train-llm) gets `<run_dir>/STOP`;
the training loop checkpoints the current step and stops, and the CLI marks the run "interrupted"
(exit code 130). Anything else, or a training job that does not stop within `stop_grace_s`
(e.g. still loading the model), is terminated and its run marked "cancelled".
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import threading
import time
import uuid
from pathlib import Path

from studio.errors import UserError
from studio.runs import Run

INTERRUPTED_EXIT = 130  # what `studio train-*` returns after a requested stop or Ctrl-C
STOP_FILE = "STOP"  # pipelines.train.STOP_FILE: <run_dir>/STOP asks the training loop to checkpoint and stop
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FINAL_STATES = ("finished", "failed", "interrupted", "cancelled")


@dataclasses.dataclass
class Job:
    id: str
    lane: str
    argv: list[str]
    log_path: Path
    owner: str = ""
    run_dir: Path | None = None  # the run folder the command writes, when it writes one
    stoppable: bool = False  # supports the clean STOP-file stop
    status: str = "queued"  # queued | running | stopping | finished | failed | interrupted | cancelled
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    error: str | None = None
    stop_requested_at: float | None = None

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATES

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        # tqdm redraws with carriage returns and cursor moves: keep the last state of each line, no escapes.
        text = ANSI_ESCAPE.sub("", text)
        kept = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
        return "\n".join([line for line in kept if line.strip()][-lines:])


def _worker(argv: list[str], log_path: str) -> None:
    """The worker process: stdout/stderr to the job's log, then exactly the CLI."""
    import sys

    log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
    log.write(f"[studio ui] job started {time.strftime('%Y-%m-%d %H:%M:%S')} (unix {time.time():.3f})\n")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout, sys.stderr = log, log
    from studio.cli import main

    try:
        code = main(argv)
    except KeyboardInterrupt:  # a stop outside the training loop's own handling
        code = INTERRUPTED_EXIT
    except SystemExit as exit_:  # argparse errors
        code = exit_.code if isinstance(exit_.code, int) else 2
    log.flush()
    sys.exit(code)


class JobManager:
    def __init__(
        self,
        limits: dict[str, int] | None = None,
        jobs_dir: str | os.PathLike = "jobs",
        max_queued: int = 8,
        max_per_owner: int = 3,
        stop_grace_s: float = 120.0,
        poll_s: float = 0.2,
    ) -> None:
        self.limits = dict(limits or {"train": 1, "light": 1})
        self.jobs_dir = Path(jobs_dir)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.max_queued, self.max_per_owner, self.stop_grace_s, self.poll_s = (
            max_queued,
            max_per_owner,
            stop_grace_s,
            poll_s,
        )
        self._jobs: dict[str, Job] = {}
        self._processes: dict[str, multiprocessing.process.BaseProcess] = {}
        self._lock = threading.RLock()
        self._context = multiprocessing.get_context("spawn")
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="studio-jobs", daemon=True)
        self._thread.start()

    # -- the API the UI calls -----------------------------------------------------------------
    def submit(
        self,
        argv: list[str],
        lane: str = "train",
        owner: str = "",
        run_dir: str | os.PathLike | None = None,
        stoppable: bool = False,
    ) -> Job:
        if lane not in self.limits:
            raise UserError(f"unknown job lane {lane!r}; lanes: {', '.join(self.limits)}")
        with self._lock:
            waiting = [j for j in self._jobs.values() if j.status == "queued"]
            if len(waiting) >= self.max_queued:
                raise UserError(f"the job queue is full ({self.max_queued} waiting); try again when a job has finished")
            mine = [j for j in self._jobs.values() if j.owner == owner and not j.done]
            if owner and len(mine) >= self.max_per_owner:
                raise UserError(
                    f"you already have {len(mine)} jobs queued or running (limit {self.max_per_owner}); "
                    "wait for one to finish or cancel one"
                )
            if run_dir is not None and any(j.run_dir == Path(run_dir) and not j.done for j in self._jobs.values()):
                raise UserError(f"a job for {Path(run_dir).name} is already queued or running")
            job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
            job = Job(
                job_id,
                lane,
                [str(a) for a in argv],
                self.jobs_dir / f"{job_id}.log",
                owner=owner,
                run_dir=Path(run_dir) if run_dir is not None else None,
                stoppable=stoppable,
            )
            self._jobs[job_id] = job
        self._schedule()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise UserError(f"no job {job_id!r}")
            return self._jobs[job_id]

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def active_run_dirs(self) -> set[Path]:
        with self._lock:
            return {j.run_dir for j in self._jobs.values() if j.run_dir is not None and not j.done}

    def cancel(self, job_id: str) -> Job:
        with self._lock:
            job = self.get(job_id)
            if job.status == "queued":
                job.status, job.ended = "cancelled", time.time()
            elif job.status == "running":
                job.status, job.stop_requested_at = "stopping", time.time()
                if not job.stoppable:
                    self._terminate(job)
                else:
                    self._request_stop(job)
            return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.get(job_id).done:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {self.get(job_id).status} after {timeout} s")
            time.sleep(self.poll_s)
        return self.get(job_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every running job (cleanly where possible) and the scheduler thread."""
        with self._lock:
            for job in self._jobs.values():
                if not job.done:
                    self.cancel(job.id)
        deadline = time.monotonic() + timeout
        while any(not j.done for j in self.jobs()) and time.monotonic() < deadline:
            time.sleep(self.poll_s)
        with self._lock:
            for job in self._jobs.values():
                if not job.done:
                    self._terminate(job)
        self._reap()
        self._closed.set()

    # -- scheduling -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed.wait(self.poll_s):
            try:
                self._reap()
                self._schedule()
                self._serve_stops()
            except Exception as error:  # the scheduler must outlive any one job's trouble
                print(f"studio ui: job scheduler: {type(error).__name__}: {error}", flush=True)

    def _schedule(self) -> None:
        with self._lock:
            for lane, limit in self.limits.items():
                running = sum(1 for j in self._jobs.values() if j.lane == lane and j.status in ("running", "stopping"))
                for job in sorted(
                    (j for j in self._jobs.values() if j.lane == lane and j.status == "queued"), key=lambda j: j.created
                )[: max(0, limit - running)]:
                    self._start(job)

    def _start(self, job: Job) -> None:
        if job.run_dir is not None and job.run_dir.exists():
            (job.run_dir / STOP_FILE).unlink(missing_ok=True)  # a stale request must not stop a resume
            if (job.run_dir / "run.json").is_file():
                Run(job.run_dir).update(status="running")
        process = self._context.Process(
            target=_worker, args=(job.argv, str(job.log_path)), name=f"studio-job-{job.id}", daemon=True
        )
        process.start()
        self._processes[job.id] = process
        job.status, job.started = "running", time.time()

    def _reap(self) -> None:
        with self._lock:
            for job_id, process in list(self._processes.items()):
                if process.is_alive():
                    continue
                process.join()
                job = self._jobs[job_id]
                code = process.exitcode
                job.returncode, job.ended = code, time.time()
                if code == 0:
                    job.status = "finished"
                elif code == INTERRUPTED_EXIT and job.stop_requested_at is not None:
                    job.status = "interrupted"
                elif job.stop_requested_at is not None:
                    job.status = "cancelled"
                    self._mark_run(job, "cancelled")
                else:
                    job.status, job.error = "failed", self._error_of(job, code)
                    self._mark_run(job, "failed", job.error)
                if job.run_dir is not None:  # once the process is gone, a stop request is moot
                    (job.run_dir / STOP_FILE).unlink(missing_ok=True)
                del self._processes[job_id]

    def _serve_stops(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                if job.status != "stopping" or job.id not in self._processes:
                    continue
                if time.time() - job.stop_requested_at > self.stop_grace_s:
                    self._terminate(job)
                else:
                    self._request_stop(job)  # the run folder may have appeared since the request

    def _request_stop(self, job: Job) -> None:
        if job.run_dir is not None and (job.run_dir / "run.json").is_file():
            (job.run_dir / STOP_FILE).touch()

    def _terminate(self, job: Job) -> None:
        process = self._processes.get(job.id)
        if process is not None and process.is_alive():
            process.terminate()
        job.stop_requested_at = job.stop_requested_at or time.time()
        job.status = "stopping"

    @staticmethod
    def _mark_run(job: Job, status: str, error: str | None = None) -> None:
        if job.run_dir is None or not (job.run_dir / "run.json").is_file():
            return
        run = Run(job.run_dir)
        if run.info.get("status") in ("running", None):  # the CLI did not get to say how it ended
            run.update(status=status, **({"error": error} if error else {}))

    @staticmethod
    def _error_of(job: Job, code: int | None) -> str:
        lines = [line.strip() for line in job.log_tail(200).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":", 1)[0]]
        return errors[-1] if errors else f"exited with code {code}" + (f": {lines[-1]}" if lines else "")
