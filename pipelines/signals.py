"""SIGINT (Ctrl-C) and SIGTERM as stop requests: the training kit's signal handling.

    with catch_stop_signals(verbose=main_process) as signals:   # studio's Run.lifecycle does this
        train(...)                                               # StopRequested after a checkpoint of the step
    signals.received                                             # signal.SIGINT / SIGTERM / None

While the handlers are installed (main thread only; the previous handlers come back on exit), a signal
does what `<run_dir>/STOP` does: every trainer's `pipelines.training.stop_requested` answers yes after
the step in progress (every process agrees: the answer is reduced across processes), the trainer
checkpoints that step and raises `StopRequested`. So the steps before a signal are never lost.

- Outside a trainer's step loop (`pipelines.training.in_step_loop`: loading, calibration, resuming, the
  final save) there is no step to finish: the signal raises KeyboardInterrupt at once, as Ctrl-C always
  did. Nothing is lost: before the loop no step was trained yet, after it every step is checkpointed.
- A second signal stops at once (KeyboardInterrupt) without the step in progress, except while a
  checkpoint is being written (`writing()`): that write finishes first, then the run stops; a third
  signal abandons the write. Every write is atomic (temporary + rename, staging folder + rename), so an
  abandoned one leaves only temporaries, which the next start removes; the older checkpoints are intact.
- A signal within `REPEAT_S` of the previous one is the same request: `accelerate launch` (torchrun's
  agent) forwards the Ctrl-C its workers already got from the terminal, which must not count twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 0.5  # a signal this soon after the previous one repeats it (a launcher forwarding it)


class StopSignals:
    """The state of the installed handlers (one per process: `SIGNALS`)."""

    def __init__(self) -> None:
        self.reset()
        self.installed = False
        self.verbose = True
        self._previous: dict[int, object] = {}

    def reset(self) -> None:
        self.received: int | None = None  # the first stop signal (its number), if any
        self.count = 0  # stop signals received
        self.listening = False  # inside a trainer's step loop (in_step_loop, or it asked stop_requested)
        self.writing_depth = 0  # checkpoint writes in progress
        self.deferred = False  # a second signal came during a checkpoint write: stop once it is written
        self.last_at = 0.0  # time.monotonic() of the last signal counted

    @property
    def name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    # -- the handler ----------------------------------------------------------------------------
    def handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.count and now - self.last_at < REPEAT_S:
            return  # the same request again (torchrun forwards the terminal's Ctrl-C to its workers)
        self.count, self.last_at = self.count + 1, now
        if self.received is None:
            self.received = signum
        again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.count == 1 and self.listening:
            self.say(
                f"{signal.Signals(signum).name}: finishing this step and checkpointing it, then stopping "
                f"({again} again to stop at once, losing this step)"
            )
            return
        if self.writing_depth and not self.deferred:
            self.deferred = True
            self.say(
                f"a checkpoint is being written: it finishes first, then the run stops ({again} again to abandon it)"
            )
            return
        raise KeyboardInterrupt

    def say(self, message: str) -> None:
        if self.verbose:  # os.write: print() from a handler can collide with a write in progress (tqdm's)
            with contextlib.suppress(OSError):
                os.write(2, f"\n{message}\n".encode())

    # -- what the kit asks ----------------------------------------------------------------------
    def stop_wanted(self) -> bool:
        """Whether a stop signal came (while the handlers are installed); also marks that a trainer's
        step loop is asking."""
        self.listening = True
        return self.installed and self.received is not None

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A checkpoint write: a second signal during it waits for it to finish (then stops the run)."""
        self.writing_depth += 1
        try:
            yield
        finally:
            self.writing_depth -= 1
        if self.deferred and not self.writing_depth and self.installed:
            self.deferred = False
            raise KeyboardInterrupt

    # -- installing ---------------------------------------------------------------------------
    def install(self, verbose: bool = True) -> bool:
        """Install the handlers (main thread only; elsewhere nothing changes and False is returned)."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return False
        self.reset()
        self.verbose = verbose
        self._previous = {number: signal.signal(number, self.handle) for number in STOP_SIGNALS}
        self.installed = True
        return True

    def restore(self) -> None:
        if not self.installed:
            return
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous, self.installed = {}, False
        self.listening = False


SIGNALS = StopSignals()


@contextlib.contextmanager
def catch_stop_signals(verbose: bool = True) -> Iterator[StopSignals]:
    """SIGINT and SIGTERM as stop requests inside the block (see the module docstring); `verbose`: say on
    stderr what happens (the main process). Yields the state, whose `received` tells which signal came.
    Nested or off the main thread it changes nothing."""
    installed = SIGNALS.install(verbose)
    try:
        yield SIGNALS
    finally:
        if installed:
            SIGNALS.restore()
