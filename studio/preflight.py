"""What a command checks before it loads a model or writes anything, beyond each option's own bounds:
the device and what the run needs of it, the folders and files it will write, a run folder's record.

Every failure is a `UserError`: one line saying what is wrong and what to do, which the CLI prints as
`error: ...` with exit code 2. Nothing here writes anything that stays: the write check makes a hidden
temporary file and removes it at once.

    device: str | None = option(None, help="cpu or cuda", check=device_problem)   # an option's own check
    writable_folder(run.runs_dir, "--runs-dir")                                  # in a command, first thing
    record = run_record(run_folder, "train-style", from_record)                   # --resume
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from peft_core.errors import AdapterError
from pipelines.errors import UserError

T = TypeVar("T")
_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


# -- devices -----------------------------------------------------------------------------------------
def device_problem(value: str) -> str | None:
    """An option `check` for a device: None if torch can use `value` on this machine, else why not."""
    match = _DEVICE.fullmatch(value)
    if match is None:
        return "not a device; use cpu, cuda or cuda:N (or leave it out: cuda when available, else cpu)"
    kind, index = match.groups()
    if kind == "cpu":
        return None
    import torch

    if kind == "mps":
        return None if torch.backends.mps.is_available() else "no Apple GPU (MPS) on this machine; use cpu"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch on this machine; use cpu, or leave the device out"
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        return f"this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
    return None


def device_or_auto_problem(value: str) -> str | None:
    """`device_problem`, where "auto" (CUDA when available, else the CPU) is also a value."""
    return None if value == "auto" else device_problem(value)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_training_device(config: Any, trains_text_encoder: bool = False) -> None:
    """What a diffusion run (`pipelines.train.TrainConfig`) needs of this machine, before its run folder
    exists: fp16 and 8-bit AdamW need a CUDA GPU (and bitsandbytes), `cuda_graph="on"` everything a
    graph needs. The trainer would otherwise find out after the run folder was made."""
    cuda = cuda_available()
    if config.mixed_precision == "fp16" and not cuda:
        raise UserError("mixed_precision 'fp16' needs a CUDA GPU, and none is visible here; use bf16 or no on the CPU")
    if config.optimizer == "adamw8bit":
        check_bitsandbytes("optimizer 'adamw8bit'", cuda)
    if config.cuda_graph == "on":
        from accelerate import PartialState

        from pipelines.train import cuda_graph_blockers

        state = PartialState()
        blockers = cuda_graph_blockers(config, state.device, state.num_processes, trains_text_encoder)
        if blockers:
            raise UserError(
                f"cuda_graph 'on' is not possible for this run: {'; '.join(blockers)}; use --cuda-graph auto or off"
            )


def check_bitsandbytes(what: str, cuda: bool) -> None:
    """bitsandbytes' 8-bit and 4-bit kernels: a CUDA GPU and the package."""
    if not cuda:
        raise UserError(f"{what} needs a CUDA GPU (bitsandbytes), and none is visible here; train without it")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"{what} needs bitsandbytes: pip install 'peft-studio[quant]'") from None


# -- folders and files it will write -------------------------------------------------------------------
def writable_folder(path: str | os.PathLike, what: str, shown: str | os.PathLike | None = None) -> Path:
    """`path` as a folder this process can write in. It may not exist yet (it is made later): then the
    nearest folder above it that exists must be writable. A file in the way, or no permission, is a
    UserError naming `what` (the option, e.g. "--runs-dir") and `shown` (default: `path`)."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir() and shown is None:
        raise UserError(f"{what} {folder} is a file, not a folder; pass a folder (it is created if missing)")
    shown = folder if shown is None else shown
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {shown}: {existing} is a file, so no folder can be made there; pass another path")
    try:  # the one sure test (permissions, a read-only disk, ACLs, root squash): write a file and remove it
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UserError(
            f"{what} {shown}: cannot write in {existing} ({error.strerror or error}); pass a path you can write to"
        ) from None
    return folder


def output_file(path: str | os.PathLike, what: str, suffix: str | None = None) -> Path:
    """`path` as a file this process can write (its folder is made if missing): not a folder, with
    `suffix` when given."""
    file = Path(path).expanduser()
    example = file / f"output{suffix or ''}"
    if file.is_dir():
        raise UserError(f"{what} {file} is a folder; name the file to write in it, e.g. {example}")
    if suffix and file.suffix.lower() != suffix:
        raise UserError(f"{what} {file} must end in {suffix} (it is written as {suffix[1:].upper()})")
    writable_folder(file.parent, what, shown=file)
    return file


# -- a run folder's record -----------------------------------------------------------------------------
def run_record(run_folder: Any, kind: str, build: Callable[[dict], T] = dict) -> T:
    """`build(config.yaml)` of a run folder of `kind` ("train-style", "train-llm", ...). A missing,
    damaged or incomplete config.yaml, or a run of another kind, is a one-line UserError saying so."""
    directory = Path(run_folder.directory)
    path = directory / "config.yaml"
    try:
        record = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{directory} has no config.yaml, so its settings are unknown; start a new run") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is damaged ({first}); restore it from a copy, or start a new run") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is damaged (not a mapping of option: value); restore it, or start a new run")
    if record.get("kind") != kind:
        raise UserError(f"{directory} is a {record.get('kind') or 'unknown'} run, not a `studio {kind}` run")
    try:
        return build(record)
    except KeyError as error:
        raise UserError(f"{path} lacks {error.args[0]!r}; restore the file, or start a new run") from None
    except (TypeError, ValueError, AttributeError, AdapterError) as error:
        raise UserError(f"{path} is damaged ({error}); restore the file, or start a new run") from None
