"""peft_core's own saved format: `<dir>/adapter_config.json` + `<dir>/adapter_model.safetensors`.

    {"format_version": 1, "adapter_name": "style", "config": {"method": "lora", ...}}

Below attach/load (peft_core.model), so every module that writes or reads an adapter folder (the
handle's save/load, LoRAM's recovery) shares one definition of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from peft_core.config import AdapterConfig, config_from_dict, get_method
from peft_core.errors import AdapterError
from peft_core.io import read_json, read_safetensors, write_json, write_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def write_adapter(
    directory: str | os.PathLike, config: AdapterConfig, name: str, state: dict[str, torch.Tensor]
) -> Path:
    """Write one adapter folder: weights first, so a folder whose config is present has its weights."""
    directory = Path(directory)
    write_safetensors(directory / WEIGHTS_NAME, state, metadata={"format": "peft_core"})
    write_json(
        directory / CONFIG_NAME, {"format_version": FORMAT_VERSION, "adapter_name": name, "config": config.to_dict()}
    )
    return directory


def read_adapter_config(directory: str | os.PathLike) -> tuple[AdapterConfig, str]:
    """The config and saved name of an adapter folder written by `AdapterHandle.save`."""
    data = read_json(Path(directory) / CONFIG_NAME)
    if not isinstance(data, dict) or "config" not in data:
        raise AdapterError(
            f"{Path(directory) / CONFIG_NAME} is not a peft_core adapter config"
            " (a PEFT-format folder? load it with peft, or re-save it with peft_core)"
        )
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(
            f"{directory} was written by a newer peft_core (format {data['format_version']}); upgrade peft-studio"
        )
    record = data["config"]
    if isinstance(record, dict) and "method" in record:  # a field the record lacks means what it meant then
        record = {**get_method(record["method"]).config_class.saved_before, **record}
    return config_from_dict(record), data.get("adapter_name", "default")


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder, keyed "<module name>.<tensor name>"."""
    return read_safetensors(Path(directory) / WEIGHTS_NAME)
