"""The run lock: one process at a time writes a run folder (a CLI command or a UI job alike).

`<run>/run.lock` names its holder: {"pid", "started" (the process's start: boot id + start time, so a
reused PID is not mistaken for the holder), "host", "argv", "since"}. The exclusion itself is an
exclusive `flock` on that file, which the kernel drops when the holder dies, however it dies (SIGKILL
included): a dead holder's lock is simply taken over by the next writer. The PID and start time say who
holds it (the refusal names it) and let a reader tell a live holder from a dead one (`holder`) without
touching the lock. Where `flock` is unavailable (not POSIX, some network filesystems), the PID and
start time decide alone.

    acquire(run_dir)     # UserError naming the holder if another live process holds it; re-entrant
    holder(run_dir)      # the live holder's record, or None (no lock, or its process is gone)
    release(run_dir)     # unlink + unlock (the CLI releases every lock it holds when it exits)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.errors import UserError

LOCK_FILE = "run.lock"
_HELD: dict[str, int] = {}  # resolved run folder -> the open, locked file descriptor of this process

try:
    import fcntl
except ImportError:  # not POSIX: the PID and start time decide alone
    fcntl = None


def process_start(pid: int) -> str | None:
    """When process `pid` started, as "<boot id>:<start ticks>" (Linux), "" if it is a zombie (dead, not
    yet reaped), None where this cannot be read (no such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, starttime field 22
    if fields[0] in ("Z", "X"):
        return ""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{boot}:{fields[19]}"


def _alive(record: dict[str, Any]) -> bool:
    """Whether the process a lock record names still runs (another host's: assumed so, it cannot be seen)."""
    if record.get("host") != socket.gethostname():
        return True
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    started, now = record.get("started"), process_start(pid)
    if now == "":
        return False  # a zombie: dead
    return started is None or now is None or now == started


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The record of the live process holding `run_dir`'s lock (this one included), or None."""
    record = _read(Path(run_dir) / LOCK_FILE)
    return record if record is not None and _alive(record) else None


def _refusal(run_dir: Path, record: dict[str, Any] | None) -> UserError:
    who = "another process"
    if record:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
        who = f"process {record.get('pid')} on {record.get('host')} (`{record.get('argv', '?')}`, since {since})"
    return UserError(
        f"{run_dir} is being written by {who}; one process at a time may train a run: wait for it to end, "
        f"or stop it (touch {run_dir / 'STOP'}, or Ctrl-C it) and resume then"
    )


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another holder has it; None: this filesystem has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK / EOPNOTSUPP: no locks here
        return None
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def acquire(run_dir: str | os.PathLike) -> None:
    """Take `run_dir`'s lock for this process (nothing to do if it already holds it); UserError naming
    the holder if another live process has it. A dead holder's lock is taken over."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD:
        return
    path = run_dir / LOCK_FILE
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        locked = _try_flock(fd)
        if locked is False:
            os.close(fd)
            raise _refusal(run_dir, holder(run_dir))
        if locked and not _same_file(fd, path):  # released (unlinked) between our open and our lock: again
            os.close(fd)
            continue
        current = holder(run_dir) if locked is None else None
        if current is not None and current.get("pid") != os.getpid():
            os.close(fd)
            raise _refusal(run_dir, current)
        _write_record(fd)
        _HELD[key] = fd
        return
    raise UserError(f"could not lock {run_dir}: other processes keep taking and releasing it; try again")


def _write_record(fd: int) -> None:
    record = {
        "pid": os.getpid(),
        "started": process_start(os.getpid()),
        "host": socket.gethostname(),
        "argv": " ".join(["studio" if Path(sys.argv[0]).name == "cli.py" else sys.argv[0], *sys.argv[1:]])[:300],
        "since": time.time(),
    }
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def release(run_dir: str | os.PathLike) -> None:
    """Give `run_dir`'s lock back (nothing to do if this process does not hold it)."""
    fd = _HELD.pop(str(Path(run_dir).resolve()), None)
    if fd is None:
        return
    try:  # unlinked while still locked: a process that opened the old file sees it is gone and starts over
        (Path(run_dir) / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(fd)  # drops the flock


def release_all() -> None:
    """Every lock this process holds (the CLI calls it when a command ends)."""
    for key in list(_HELD):
        with contextlib.suppress(OSError):
            release(key)
