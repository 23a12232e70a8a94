"""Training checkpoints that resume exactly, written atomically, without pickle.

A checkpoint is a folder `<run>/checkpoints/step-<N>/` holding
- `adapter/`                      the adapter (peft_core's format),
- `optimizer.safetensors` + `.json` the optimizer state (tensors / everything else),
- `rng.safetensors`               torch CPU and CUDA generator states,
- `state.json`                    step, scheduler state, Python and NumPy RNG states, extras.

The folder is first written as a hidden sibling, fsynced, then renamed into place, so a crash
leaves either no checkpoint or a complete one; `latest_checkpoint` ignores the hidden ones, and
`remove_partial_writes` (called when a run resumes) deletes them and any half-written temporary.
An old checkpoint is pruned by renaming it to a hidden `.deleting-step-<N>` first, so a crash half-way
through the deletion never leaves a half-deleted `step-<N>/`. A checkpoint damaged after the fact
(a truncated file, broken JSON: a copy cut short, a disk fault) is skipped by `latest_checkpoint`,
with a warning, for the newest intact one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peft_core import AdapterHandle
from peft_core.io import read_json, read_safetensors, remove_temporaries, write_json, write_safetensors
from pipelines.errors import UserError

CHECKPOINTS = "checkpoints"
DELETING = ".deleting-"  # prefix of a pruned checkpoint being deleted


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    handle: AdapterHandle,
    adapter_names: list[str],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` ones."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    staging = root / f".step-{step:08d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in adapter_names:
        handle.save(staging / "adapter" / name, name=name)
    tensors, structure = _flatten_optimizer(optimizer.state_dict())
    write_safetensors(staging / "optimizer.safetensors", tensors)
    write_json(staging / "optimizer.json", structure)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    write_safetensors(staging / "rng.safetensors", rng)
    numpy_state = np.random.get_state()
    write_json(
        staging / "state.json",
        {
            "step": step,
            "adapters": adapter_names,
            "lr_scheduler": None if lr_scheduler is None else tensor_lr_to_float(lr_scheduler.state_dict()),
            "python_random": _to_json(random.getstate()),
            "numpy_random": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "extra": extra or {},
        },
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _fsync_dir(root)
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        doomed = root / f"{DELETING}{old.name}"  # renamed away first: never a half-deleted step-N/
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete and intact `step-*` checkpoint (None if there is none). A damaged one (see
    `checkpoint_problem`) is skipped with a warning naming it and the one used instead."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())
    damaged = []
    for candidate in reversed(complete):
        problem = checkpoint_problem(candidate)
        if problem is None:
            if damaged:
                _warn_damaged(damaged, f"resuming from {candidate.name} instead")
            return candidate
        damaged.append((candidate, problem))
    if damaged:
        _warn_damaged(damaged, "no intact checkpoint is left: the run starts again from step 0")
    return None


def _warn_damaged(damaged: list[tuple[Path, str]], outcome: str) -> None:
    listed = "; ".join(f"{path.name}: {problem}" for path, problem in damaged)
    warnings.warn(f"skipping damaged checkpoint(s) in {damaged[0][0].parent} ({listed}); {outcome}", stacklevel=1)


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder (a missing file, a JSON file that does not parse, a
    safetensors file whose header or length is wrong, e.g. truncated), or None if it looks whole.
    Reads every JSON file and the safetensors headers, not the tensors: cheap."""
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        adapters = list(state["adapters"])
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"state.json is unreadable ({type(error).__name__}: {error})"
    required = ["optimizer.json", "optimizer.safetensors", "rng.safetensors"]
    required += [
        f"adapter/{name}/{file}" for name in adapters for file in ("adapter_config.json", "adapter_model.safetensors")
    ]
    missing = [name for name in required if not (checkpoint / name).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    for path in sorted(checkpoint.rglob("*")):
        problem = _file_problem(path)
        if problem:
            return f"{path.relative_to(checkpoint).as_posix()} {problem}"
    return None


def _file_problem(path: Path) -> str | None:
    """Whether a checkpoint file is damaged: JSON that does not parse, a safetensors file cut short."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            return _safetensors_problem(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        return f"is unreadable ({type(error).__name__}: {error})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """The safetensors layout: an 8-byte header length, the JSON header, then exactly the data it indexes."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return f"is truncated ({size} bytes)"
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            return f"is truncated (header of {header_length} bytes, file of {size})"
        header = json.loads(file.read(header_length))
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_length + max(ends, default=0)
    if size != expected:
        return f"is truncated ({size} of {expected} bytes)" if size < expected else f"has {size - expected} extra bytes"
    return None


def remove_partial_writes(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what a killed run left half-written: checkpoint staging folders, pruned checkpoints half
    deleted, and atomic-write temporaries anywhere in the run folder. Call it only while no other
    process writes there (studio holds the run lock)."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    removed = []
    if root.is_dir():
        for staging in [*root.glob(".step-*.partial"), *root.glob(f"{DELETING}step-*")]:
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed + (remove_temporaries(run_dir) if run_dir.is_dir() else [])


def load_checkpoint(
    checkpoint: str | os.PathLike,
    handle: AdapterHandle,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, Any]:
    """Restore adapters, optimizer, scheduler and every RNG; returns state.json (step, extra)."""
    checkpoint = Path(checkpoint)
    state = read_json(checkpoint / "state.json")
    for name in state["adapters"]:
        if name not in handle.adapter_names:
            raise UserError(
                f"{checkpoint} holds adapter {name!r}, which this run does not have; resume with the same config"
            )
        handle.load_state_dict(read_safetensors(checkpoint / "adapter" / name / "adapter_model.safetensors"), name=name)
    structure = read_json(checkpoint / "optimizer.json")
    optimizer.load_state_dict(_unflatten_optimizer(read_safetensors(checkpoint / "optimizer.safetensors"), structure))
    if lr_scheduler is not None and state["lr_scheduler"] is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng = read_safetensors(checkpoint / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_from_json(state["python_random"]))
    kind, keys, *rest = state["numpy_random"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return state


# -- optimizer state <-> (tensors, JSON) ------------------------------------------------------
def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        scalars[str(index)] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value
            else:
                scalars[str(index)][key] = value
    # A capturable optimizer's learning rate is a device tensor (pipelines.cuda_graphs); stored as a number.
    return tensors, {"param_groups": tensor_lr_to_float(state_dict["param_groups"]), "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in structure["scalars"].items()}
    for key, tensor in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": structure["param_groups"]}


def tensor_lr_to_float(value: Any) -> Any:
    """Optimizer/scheduler state with device-tensor learning rates, made JSON-able (floats)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, dict):
        return {k: tensor_lr_to_float(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(tensor_lr_to_float(v) for v in value)
    return value


def _to_json(value: Any) -> Any:
    return [_to_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
