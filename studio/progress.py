"""The CLI's view of progress events: a tqdm bar with loss, learning rate and sample paths."""

from __future__ import annotations

from typing import Any


class ProgressPrinter:
    def __init__(self, total_steps: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
        self.first_step: int | None = None

    def __call__(self, event: Any) -> None:
        if event.kind == "step":
            if self.first_step is None:  # the rate (and ETA) counts this process's steps, from its first on:
                self.first_step = event.step  # a resume starts mid-way, after loading
                self.bar.reset()
                self.bar.initial = self.bar.last_print_n = event.step
            self.bar.n = event.step
            if event.loss is not None:  # None: a stage loaded from an earlier run, not trained
                self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
            self.bar.refresh()
        elif event.kind in ("sample", "checkpoint"):
            self.bar.write(f"{event.kind} at step {event.step}: {event.path}")
        elif event.kind == "message" and event.message:  # e.g. the divergence warning
            self.bar.write(event.message)

    def close(self) -> None:
        self.bar.close()
