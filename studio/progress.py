"""The CLI's view of progress events: a tqdm bar with loss, learning rate and sample paths."""

from __future__ import annotations

from typing import Any


class ProgressPrinter:
    def __init__(self, total_steps: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def __call__(self, event: Any) -> None:
        if event.kind == "step":
            self.bar.n = event.step
            if event.loss is not None:  # None: a stage loaded from an earlier run, not trained
                self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
            self.bar.refresh()
        elif event.kind in ("sample", "checkpoint"):
            self.bar.write(f"{event.kind} at step {event.step}: {event.path}")

    def close(self) -> None:
        self.bar.close()
