"""Running a model on calibration data: what the `prepare` steps of data-driven methods (CorDA, SPT)
and the analysis tools share. Below the methods, so they use it without importing attach/load."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from peft_core.errors import AdapterError


def calibration_outputs(
    model: nn.Module, batches: Iterable[Any], step: Callable[[nn.Module, Any], Any] | None, method: str
) -> Iterator[Any]:
    """What `prepare` steps share: run `step(model, batch)` on each batch and yield its result.

    The default step calls model(batch), model(**batch) for a dict, model(*batch) for a tuple or list.
    A failing batch becomes an AdapterError naming the batch and its shapes; no batch at all is an error.
    """
    step = step or call_model
    count = 0
    for index, batch in enumerate(batches):
        try:
            output = step(model, batch)
        except (RuntimeError, ValueError, IndexError, TypeError) as error:
            raise AdapterError(
                f"{method}.prepare: the model failed on calibration batch {index} ({_describe(batch)}): {error}; "
                "pass batches shaped like the model's training inputs (or a `step` that feeds them)"
            ) from error
        count += 1
        yield output
    if count == 0:
        raise AdapterError(f"{method}.prepare: the calibration data is empty; pass at least one batch")


Entry = TypeVar("Entry")


class PerModule(Mapping[str, Entry], Generic[Entry]):
    """A `prepare` step's result: a read-only mapping module name -> that module's entry, which is what
    attach(..., prepared=) hands each module's adapter. Subclasses say which of their dicts holds it."""

    @abstractmethod
    def entries(self) -> dict[str, Entry]:
        """The dict behind the mapping (module name -> entry)."""

    def __getitem__(self, name: str) -> Entry:
        return self.entries()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self.entries())


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run `model` on one calibration batch: a mapping of keyword arguments, a tuple of positional ones, or a tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a {batch.dtype} tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return ", ".join(f"{key}: {_describe(value)}" for key, value in batch.items())
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(item) for item in batch) + ")"
    return type(batch).__name__
