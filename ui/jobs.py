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

Every job is also a record, `<workspace>/jobs/<id>.json` (command, owner, run folder, status, the
worker's pid and process start time), rewritten at each change. A page that was reloaded, or the Runs
tab, finds a running job there (`latest`, `active_job`), so Cancel never depends on the browser
having kept a job id. A restarted server reads the records back: a job whose worker still runs is
adopted (followed and cancellable until its worker exits), the others get their final state from
run.json; a job that was only queued is cancelled.

A worker never outlives its server: it watches its parent process (`os.getppid()`), and once the
server is gone (even SIGKILLed) it sends itself SIGTERM, which the CLI turns into a stop with a
checkpoint of the step in progress (studio.runs' lifecycle, pipelines.signals), and exits after at
most `orphan_grace_s` in any case. So a restarted server never finds a second writer on a run: the
manager refuses a second job on a run folder while one is queued, running or adopted, and the run
lock (studio.run_lock, taken by the command itself) refuses a second writer from anywhere.

Lanes keep a long training from blocking a quick generation: each lane has its own concurrency
limit, and the manager bounds queued jobs in total and per owner (a user, or a browser session
without a login), so one user cannot fill the queue.

Cancel: a training job that supports it (train-style / train-content / train-llm / break-for-make)
gets `<run_dir>/STOP`; the training loop checkpoints the current step and stops, and the CLI marks the
run "interrupted" (exit code 130). Anything else, or a training job that does not stop within
`stop_grace_s` (e.g. still loading the model), gets SIGTERM (a training still stops with a checkpoint:
exit 143) and, `KILL_AFTER_S` later, SIGKILL; a run its command could not mark is marked "cancelled".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import re
import signal
import threading
import time
import uuid
from pathlib import Path

from studio.errors import UserError
from studio.runs import Run

INTERRUPTED_EXIT = 130  # what `studio train-*` returns after a requested stop or Ctrl-C
TERMINATED_EXIT = 143  # ... after SIGTERM (also a checkpointed stop); and an orphaned worker's own exit
KILL_AFTER_S = 30.0  # after the stop grace and SIGTERM, how long until SIGKILL
STOP_FILE = "STOP"  # pipelines.train.STOP_FILE: <run_dir>/STOP asks the training loop to checkpoint and stop
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FINAL_STATES = ("finished", "failed", "interrupted", "cancelled")
RECORD_FIELDS = ("id", "lane", "argv", "owner", "run_dir", "stoppable", "status", "created", "started", "ended")
RECORD_FIELDS += ("returncode", "error", "stop_requested_at", "pid", "pid_start")
KEPT_RECORDS = 500  # finished jobs a restarted server reads back (the newest)


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
    pid: int | None = None  # the worker process
    pid_start: str | None = None  # its start time (process_start): a reused pid is not our worker

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATES

    @property
    def command(self) -> str:
        """The studio subcommand ("train-style", "generate", ...)."""
        return self.argv[0] if self.argv else ""

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        # tqdm redraws with carriage returns and cursor moves: keep the last state of each line, no escapes.
        text = ANSI_ESCAPE.sub("", text)
        kept = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
        return "\n".join([line for line in kept if line.strip()][-lines:])

    def record(self) -> dict:
        data = {name: getattr(self, name) for name in RECORD_FIELDS}
        data["run_dir"] = None if self.run_dir is None else str(self.run_dir)
        return data

    @classmethod
    def from_record(cls, data: dict, jobs_dir: Path) -> Job:
        values = {name: data.get(name) for name in RECORD_FIELDS if name in data}
        values["run_dir"] = None if not data.get("run_dir") else Path(data["run_dir"])
        values["argv"] = [str(a) for a in data.get("argv") or []]
        return cls(log_path=jobs_dir / f"{data['id']}.log", **values)


def process_start(pid: int | None) -> str | None:
    """The start time of process `pid` (clock ticks since boot, from /proc): with the pid, it names
    one process even after the pid is reused. "" where there is no /proc but the process exists;
    None if there is no such process (or only its zombie)."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": field 3 (state) is fields[0]
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22, starttime


def alive(pid: int | None, start: str | None) -> bool:
    """Whether process `pid` is still the one that started at `start`."""
    now = process_start(pid)
    return now is not None and (not start or not now or now == start)


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(partial, path)


def writer_of(run_dir: Path) -> int | None:
    """The pid of another live process holding the run's lock (studio.run_lock), if any."""
    holder = Run(run_dir).holder()
    pid = holder.get("pid") if holder else None
    return pid if pid != os.getpid() else None


def _mark_run(run_dir: Path | None, status: str, error: str | None = None) -> None:
    """Say how a run ended where its command could not (killed, or never got that far): never while
    another process holds the run (a job refused by the run lock must not mark the holder's run)."""
    if run_dir is None or not (run_dir / "run.json").is_file() or writer_of(run_dir) is not None:
        return
    run = Run(run_dir)
    if run.info.get("status") in ("running", None):  # the CLI did not get to say how it ended
        run.update(status=status, **({"error": error} if error else {}))


def _watch_server(server_pid: int, run_dir: str | None, grace_s: float, poll_s: float = 0.5) -> None:
    """In the worker: once the server that started it is gone, stop this job and exit within `grace_s`.
    SIGTERM to itself is the CLI's clean stop inside a training (a checkpoint of the step in progress,
    run.json "interrupted") and ends anything else at once. A worker never outlives its server."""
    while os.getppid() == server_pid:
        time.sleep(poll_s)
    print(f"\n[studio ui] the server (pid {server_pid}) is gone: stopping this job", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)  # the main thread ends the process when the job stops in time
    _mark_run(Path(run_dir) if run_dir else None, "cancelled", "the server stopped while the job ran")
    print("[studio ui] exiting: the job did not stop and its server is gone", flush=True)
    os._exit(TERMINATED_EXIT)


def _worker(
    argv: list[str],
    log_path: str,
    server_pid: int | None = None,
    run_dir: str | None = None,
    orphan_grace_s: float = 30.0,
) -> None:
    """The worker process: stdout/stderr to the job's log, a watch on the server, then exactly the CLI."""
    import sys

    log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
    log.write(f"[studio ui] job started {time.strftime('%Y-%m-%d %H:%M:%S')} (unix {time.time():.3f})\n")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout, sys.stderr = log, log
    if server_pid is not None:
        threading.Thread(
            target=_watch_server, args=(server_pid, run_dir, orphan_grace_s), name="studio-server-watch", daemon=True
        ).start()
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
        orphan_grace_s: float = 30.0,
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
        self.orphan_grace_s = orphan_grace_s
        self._jobs: dict[str, Job] = {}
        self._processes: dict[str, multiprocessing.process.BaseProcess] = {}
        self._adopted: set[str] = set()  # jobs of an earlier server whose worker still runs
        self._signalled: dict[str, float] = {}  # job id -> when its worker got SIGTERM
        self._lock = threading.RLock()
        self._context = multiprocessing.get_context("spawn")
        self._closed = threading.Event()
        self._load_records()
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
            if run_dir is not None and self.active_job(run_dir) is not None:
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
            self._save(job)
        self._schedule()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise UserError(f"no job {job_id!r}")
            return self._jobs[job_id]

    def jobs(self, owner: str | None = None) -> list[Job]:
        """Every job (of `owner`, if given), newest first."""
        with self._lock:
            chosen = [j for j in self._jobs.values() if owner is None or j.owner == owner]
        return sorted(chosen, key=lambda j: j.created, reverse=True)

    def latest(self, commands: tuple[str, ...], owner: str | None = None, active: bool = True) -> Job | None:
        """The newest job running one of `commands` (of `owner`, if given; only unfinished ones if `active`)."""
        for job in self.jobs(owner):
            if job.command in commands and not (active and job.done):
                return job
        return None

    def active_job(self, run_dir: str | os.PathLike) -> Job | None:
        """The queued, running or adopted job writing `run_dir`, if any."""
        wanted = Path(run_dir)
        with self._lock:
            return next((j for j in self._jobs.values() if j.run_dir == wanted and not j.done), None)

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
            elif job.status == "stopping" and job.id in self._adopted and job.stop_requested_at is None:
                job.stop_requested_at = time.time()
                self._request_stop(job)
            self._save(job)
            return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.get(job_id).done:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {self.get(job_id).status} after {timeout} s")
            time.sleep(self.poll_s)
        return self.get(job_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every running job (cleanly where possible) and the scheduler thread. Adopted workers
        (an earlier server's) stop by themselves."""
        with self._lock:
            for job in self._jobs.values():
                if not job.done and job.id not in self._adopted:
                    self.cancel(job.id)
        deadline = time.monotonic() + timeout
        while any(not j.done and j.id not in self._adopted for j in self.jobs()) and time.monotonic() < deadline:
            time.sleep(self.poll_s)
        with self._lock:
            for job in self._jobs.values():
                if not job.done and job.id not in self._adopted:
                    self._terminate(job)
        self._reap()
        self._closed.set()

    # -- records ------------------------------------------------------------------------------
    def _save(self, job: Job) -> None:
        try:
            _write_json(self.jobs_dir / f"{job.id}.json", job.record())
        except OSError as error:  # a full disk must not take the scheduler down
            print(f"studio ui: cannot write the record of job {job.id}: {error}", flush=True)

    def _load_records(self) -> None:
        """Read back the jobs of an earlier server: adopt the ones whose worker still runs, settle the rest."""
        records = []
        for path in self.jobs_dir.glob("*.json"):
            try:
                records.append(Job.from_record(json.loads(path.read_text(encoding="utf-8")), self.jobs_dir))
            except (OSError, ValueError, TypeError, KeyError):
                continue
        records.sort(key=lambda j: j.created or 0, reverse=True)
        for job in records[:KEPT_RECORDS]:
            self._jobs[job.id] = job
            if job.done:
                continue
            if job.status == "queued":
                job.status, job.ended, job.error = "cancelled", time.time(), "the server restarted before it started"
            elif alive(job.pid, job.pid_start):
                job.status = "stopping"  # its worker saw its server go and is stopping
                self._adopted.add(job.id)
            else:
                self._settle(job, "the server stopped while the job ran")
            self._save(job)

    def _settle(self, job: Job, reason: str) -> None:
        """The final state of a job whose worker is gone and left no exit code: what run.json says."""
        info = Run(job.run_dir).info if job.run_dir is not None and (job.run_dir / "run.json").is_file() else {}
        status = info.get("status")
        job.ended = time.time()
        if status in ("finished", "interrupted"):
            job.status = status
        elif status == "failed":
            job.status, job.error = "failed", info.get("error") or reason
        else:
            job.status, job.error = "cancelled", reason
            _mark_run(job.run_dir, "cancelled", reason)
        if job.run_dir is not None:
            (job.run_dir / STOP_FILE).unlink(missing_ok=True)

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
        process = self._context.Process(
            target=_worker,
            args=(
                job.argv,
                str(job.log_path),
                os.getpid(),
                None if job.run_dir is None else str(job.run_dir),
                self.orphan_grace_s,
            ),
            name=f"studio-job-{job.id}",
            daemon=True,
        )
        process.start()
        self._processes[job.id] = process
        job.status, job.started = "running", time.time()
        job.pid, job.pid_start = process.pid, process_start(process.pid)
        self._save(job)

    def _reap(self) -> None:
        with self._lock:
            for job_id, process in list(self._processes.items()):
                if process.is_alive():
                    continue
                process.join()
                job = self._jobs[job_id]
                code = process.exitcode
                job.returncode, job.ended = code, time.time()
                self._conclude(job, code)
                if job.run_dir is not None:  # once the process is gone, a stop request is moot
                    (job.run_dir / STOP_FILE).unlink(missing_ok=True)
                del self._processes[job_id]
                self._save(job)
            for job_id in list(self._adopted):
                job = self._jobs[job_id]
                if not alive(job.pid, job.pid_start):
                    self._settle(job, "the server stopped while the job ran")
                    self._adopted.discard(job_id)
                    self._save(job)

    def _serve_stops(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                if job.status != "stopping" or job.stop_requested_at is None:
                    continue
                if job.id not in self._processes and job.id not in self._adopted:
                    continue
                if time.time() - job.stop_requested_at > self.stop_grace_s:
                    self._terminate(job)
                else:
                    self._request_stop(job)  # the run folder may have appeared since the request

    def _request_stop(self, job: Job) -> None:
        if job.run_dir is not None and (job.run_dir / "run.json").is_file():
            (job.run_dir / STOP_FILE).touch()

    def _conclude(self, job: Job, code: int | None) -> None:
        """A job's final state from its worker's exit code (and, after a stop request, its run.json)."""
        stopped = job.stop_requested_at is not None
        said = Run(job.run_dir).info.get("status") if job.run_dir and (job.run_dir / "run.json").is_file() else None
        if code == 0:
            job.status = "finished"
        elif stopped and (code == INTERRUPTED_EXIT or (code == TERMINATED_EXIT and said == "interrupted")):
            job.status = "interrupted"  # a STOP file, or SIGTERM after the grace: both checkpointed
        elif stopped:
            job.status = "cancelled"
            _mark_run(job.run_dir, "cancelled")
        else:
            job.status, job.error = "failed", self._error_of(job, code)
            _mark_run(job.run_dir, "failed", job.error)

    def _terminate(self, job: Job) -> None:
        """SIGTERM once (a training still checkpoints the step in progress), SIGKILL `KILL_AFTER_S` later."""
        now = time.time()
        sent = self._signalled.get(job.id)
        if sent is None or now - sent > KILL_AFTER_S:
            kill = sent is not None
            process = self._processes.get(job.id)
            if process is not None and process.is_alive():
                process.kill() if kill else process.terminate()
            elif job.id in self._adopted and alive(job.pid, job.pid_start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(job.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self._signalled.setdefault(job.id, now)
        job.stop_requested_at = job.stop_requested_at or now
        job.status = "stopping"

    @staticmethod
    def _error_of(job: Job, code: int | None) -> str:
        lines = [line.strip() for line in job.log_tail(200).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":", 1)[0]]
        return errors[-1] if errors else f"exited with code {code}" + (f": {lines[-1]}" if lines else "")
