"""Track the attention regime during training: rho every N steps, a warning when a head crosses a threshold.

LoRA starts at B = 0, so a model begins in its base regime; training can push heads across
rho = 0.5 or 1.5 (the same flag is a bf16/quantization risk: larger Q/K entries, larger logits).

    tracker = RegimeTracker(model, every=50, log_path=run_dir / "regime.jsonl")
    train(..., on_event=tracker.wrap(progress))     # a TrainEvent consumer (kind "step", step = steps done)
    # or, in a hand-written loop:
    with tracker.observe(step):
        loss = model(**batch).loss

Each observation measures one forward (the first call of every attention module after arming;
a recompute under gradient checkpointing is not counted twice) under no_grad, on detached tensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from peft_core.analysis.regime import LABELS, AttentionSite, RegimeRecorder

logger = logging.getLogger("peft_core.analysis")


class RegimeTracker:
    def __init__(
        self,
        model: nn.Module,
        every: int = 100,
        sites: list[AttentionSite] | None = None,
        config: Any = None,
        log_path: str | os.PathLike | None = None,
        on_warning: Callable[[str], Any] | None = None,
        observe_first: bool = True,
    ) -> None:
        """every: observe one forward every `every` optimizer steps; log_path: append one JSON line
        per observation; on_warning(message): called on every crossing (they are also logged)."""
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model, self.every = model, every
        self._sites, self._config = sites, config
        self.log_path = Path(log_path) if log_path is not None else None
        self.on_warning = on_warning
        self.history: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self._labels: dict[tuple[str, int], str] = {}
        self._recorder: RegimeRecorder | None = None
        self._armed_step: int | None = None
        if observe_first:
            self.arm(0)

    # -- the two ways in -------------------------------------------------------------------------
    def __call__(self, event: Any) -> None:
        """A TrainEvent consumer: after step `event.step` finishes, collect what the last forward
        recorded; arm for the next forward when `event.step` is a multiple of `every`."""
        if getattr(event, "kind", None) != "step":
            return
        self.collect()
        if event.step % self.every == 0:
            self.arm(event.step)

    def wrap(self, consumer: Callable[[Any], Any] | None) -> Callable[[Any], None]:
        """An event consumer that feeds this tracker, then `consumer` (e.g. the progress bar)."""

        def both(event: Any) -> None:
            self(event)
            if consumer is not None:
                consumer(event)

        return both

    @contextlib.contextmanager
    def observe(self, step: int) -> Iterator[None]:
        """Measure the forward run inside this block when `step` is a multiple of `every`."""
        if step % self.every != 0 or self._recorder is not None:
            yield
            return
        self.arm(step)
        try:
            yield
        finally:
            self.collect()

    # -- plumbing ----------------------------------------------------------------------------------
    def arm(self, step: int) -> None:
        if self._recorder is not None:
            return
        self._recorder = RegimeRecorder(self.model, sites=self._sites, config=self._config, record_calls_per_site=1)
        self._sites = self._recorder.sites
        self._recorder.__enter__()
        self._armed_step = step

    def collect(self) -> dict[str, Any] | None:
        """Remove the hooks; log the observation (None if nothing ran since arming)."""
        if self._recorder is None:
            return None
        recorder, step = self._recorder, self._armed_step
        recorder.__exit__(None, None, None)
        self._recorder = self._armed_step = None
        report = recorder.report(batches=1)
        if not report.heads:
            return None
        entry = {
            "step": step,
            "max_rho": max(head.rho for head in report.heads),
            "counts": report.counts(),
            "rho": {site.name: [round(h.rho, 4) for h in report.heads if h.site == site.name] for site in report.sites},
        }
        crossings = []
        for head in report.heads:
            key = (head.site, head.head)
            previous = self._labels.get(key)
            if previous is not None and LABELS.index(head.label) > LABELS.index(previous):
                crossings.append(
                    f"step {step}: {head.site} head {head.head} crossed from {previous} to {head.label} "
                    f"(rho {head.rho:.2f}, max logit {head.max_logit:.1f})"
                )
            self._labels[key] = head.label
        entry["crossings"] = crossings
        self.history.append(entry)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as handle:
                handle.write(json.dumps(entry, allow_nan=False, default=_json_number) + "\n")
        for message in crossings:
            self.warnings.append(message)
            logger.warning(message)
            if self.on_warning is not None:
                self.on_warning(message)
        return entry

    def close(self) -> None:
        """Remove any hooks still installed (an armed observation whose forward never came)."""
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._recorder = self._armed_step = None


def _json_number(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else None
