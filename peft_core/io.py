"""Atomic file writes and safetensors/JSON I/O (never pickle).

Every write goes to a temporary file in the same folder, is fsynced, and then renamed over the
destination, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from peft_core.errors import AdapterError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # never loaded: unpickling runs code
TEMPORARY_SUFFIX = ".tmp"  # atomic_write_bytes' temporaries: ".<name>.<random>.tmp" next to the destination


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise AdapterError(
                f"no space left to write {path} ({error.strerror}); free some disk space and "
                "run again (the previous version of the file, if any, is unchanged)"
            ) from None
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries a killed `atomic_write_bytes` left under `directory` (recursively).

    Only for a folder no other process is writing to (a run being resumed); returns what was removed.
    """
    removed = []
    for path in Path(directory).rglob(f".*{TEMPORARY_SUFFIX}"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def finite_json(value: Any) -> Any:
    """`value` with every NaN/inf float replaced by None: JSON has no NaN or Infinity (Python writes them,
    strict readers refuse them). For reports (a run's loss), where "no value" is the truth."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically write `data` as strict JSON: a NaN or inf anywhere in it is refused (AdapterError), never
    written as the invalid `NaN`; pass reports through `finite_json` first."""
    try:
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as error:
        raise AdapterError(f"refusing to write {path}: {error} (JSON has no NaN or Infinity)") from None
    atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path} does not exist; expected an adapter folder written by peft_core (save())")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(
            f"{path} is not valid JSON ({error}); the file is damaged, re-save or re-export it"
        ) from None


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    # Own, contiguous CPU copies: safetensors refuses views and shared storage.
    owned = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    atomic_write_bytes(path, safetensors_save(owned, metadata=metadata))


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        pickles = [p.name for p in sorted(path.parent.glob(f"{path.stem}.*")) if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterError(
                f"{path.parent} holds {pickles[0]}, a pickle file, where {path.name} is expected; "
                "pickle can run code when loaded, so it is never read: convert it to safetensors "
                "(safetensors.torch.save_file) in a place you trust"
            )
        raise AdapterError(f"{path} does not exist; expected the adapter's weights next to its config")
    try:
        return safetensors_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise AdapterError(f"{path} is not a readable safetensors file ({error}); it may be truncated") from None
