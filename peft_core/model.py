"""attach / load and the AdapterHandle: the one contract every method shares.

    handle = attach(model, LoraConfig(targets=["q_proj", "v_proj"]), name="style")
    ... train handle.trainable_parameters() ...
    handle.save("runs/style/adapter")
    handle = load(fresh_model, "runs/style/adapter")   # same outputs
    handle.merge(); handle.unmerge()                   # exact round trip

The handle wraps each targeted module in an `AdaptedModule` (in place, so the model object is
the same) and keeps one config per named adapter. Nothing here knows a particular method: the
registry gives the adapter class, and the adapter class supplies the math.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_core.calibration import calibration_outputs, call_model
from peft_core.config import AdapterConfig, MethodSpec, get_method
from peft_core.errors import AdapterError
from peft_core.export import export_adapter
from peft_core.layer import AdaptedModule, Adapter
from peft_core.saved import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    read_adapter_config,
    read_adapter_weights,
    write_adapter,
)
from peft_core.targets import find_targets

# The saved-format names and the calibration helpers live below this module (peft_core.saved,
# peft_core.calibration), so methods use them without importing attach/load; they stay importable here.
__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "AdapterHandle",
    "attach",
    "calibration_outputs",
    "call_model",
    "get_handle",
    "load",
    "read_adapter_config",
]


class AdapterHandle:
    """Named adapters on one model: add, enable/disable, weigh, train, merge, save, export."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.configs: dict[str, AdapterConfig] = {}

    # -- adding and removing ----------------------------------------------------------------
    def add(
        self,
        config: AdapterConfig,
        name: str = "default",
        weight: float = 1.0,
        trainable: bool = True,
        prepared: Mapping[str, Any] | None = None,
    ) -> AdapterHandle:
        """Attach a new named adapter to every module `config.targets` selects.

        prepared: for methods with a data-driven `prepare` step (CorDA, SPT), its result: a mapping
            module name -> that module's entry, handed to the module's adapter constructor.
        """
        if name in self.configs:
            raise AdapterError(f"an adapter named {name!r} already exists; pick another name or remove it first")
        if not name.isidentifier():
            raise AdapterError(f"adapter name {name!r} must be a Python identifier (letters, digits, _)")
        spec = get_method(config.method)
        module_names = find_targets(self.model, config.targets, config.exclude, spec.capabilities.wraps)
        _check_prepared(spec, module_names, prepared)
        # Build every adapter before inserting any, so a failure leaves the model untouched.
        wrappers = {module_name: self._wrapper(module_name, create=False) for module_name in module_names}
        adapters = {}
        for module_name in module_names:
            base = wrappers[module_name].base_layer if wrappers[module_name] else self.model.get_submodule(module_name)
            extra = {"prepared": prepared[module_name]} if spec.needs_data else {}
            adapters[module_name] = spec.adapter_class(base, config, module_name, **extra)
        spec.adapter_class.tie_shared(list(adapters.values()))
        if not self.configs:
            for parameter in self.model.parameters():  # the base model is frozen once adapters exist
                parameter.requires_grad_(False)
        for module_name, adapter in adapters.items():
            self._wrapper(module_name, create=True).add_adapter(name, adapter, weight)
            adapter.requires_grad_(trainable)
        self.configs[name] = config
        return self

    def remove(self, name: str) -> None:
        self._check_name(name)
        for module_name, wrapper in list(self.wrappers(name)):
            wrapper.remove_adapter(name)
            if not wrapper.adapters and not wrapper.merged:
                self._replace(module_name, wrapper.base_layer)  # no adapter left: unwrap
        del self.configs[name]

    # -- state ------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    @property
    def enabled_names(self) -> list[str]:
        """The adapters that currently act in the forward (not disabled)."""
        return self._enabled_names()

    def enable(self, name: str) -> None:
        self._check_name(name)
        for _, wrapper in self.wrappers(name):
            wrapper.set_enabled(name, True)

    def disable(self, name: str) -> None:
        self._check_name(name)
        for _, wrapper in self.wrappers(name):
            wrapper.set_enabled(name, False)

    def set_weight(self, name: str, weight: float) -> None:
        """Scale adapter `name`'s update (composition: output = base + sum_i weight_i * update_i)."""
        self._check_name(name)
        for _, wrapper in self.wrappers(name):
            if wrapper.is_merged(name):
                raise AdapterError(f"adapter {name!r} is merged; unmerge before changing its weight")
            wrapper.set_weight(name, weight)

    def set_trainable(self, names: str | Iterable[str]) -> None:
        """Make exactly these adapters trainable (all others frozen)."""
        names = {names} if isinstance(names, str) else set(names)
        for name in names:
            self._check_name(name)
        for _, wrapper in self.wrappers():
            for name, adapter in wrapper.adapters.items():
                adapter.requires_grad_(name in names)

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                yield name, parameter

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for _, parameter in self.named_trainable_parameters()]

    def parameter_count(self, name: str) -> int:
        self._check_name(name)
        return sum(p.numel() for _, w in self.wrappers(name) for p in w.adapters[name].parameters())

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Tell adapters that keep state in base weights (PaCA resident columns) about every step.

        Torch optimizers already bump the parameters' version counters, which adapters watch;
        this also covers optimizers that write parameters behind autograd (e.g. fused 8-bit ones).
        Call it after adding the adapters the optimizer trains.
        """
        optimizer.register_step_post_hook(lambda *_args, **_kwargs: self.after_optimizer_step())

    def after_optimizer_step(self, refresh: bool = True) -> None:
        """The parameters moved outside the adapters' sight (an optimizer step replayed from a CUDA
        graph bumps no version counter): adapters caching something derived from them refresh it,
        now (refresh=True) or in their next forward (False)."""
        by_class: dict[type, list[tuple[Adapter, nn.Module, float]]] = {}
        for _, wrapper in self.wrappers():
            for name, adapter in wrapper.adapters.items():
                by_class.setdefault(type(adapter), []).append(
                    (adapter, wrapper.base_layer, wrapper.adapter_weights[name])
                )
        for adapter_class, items in by_class.items():
            adapter_class.after_optimizer_step(items, refresh)

    # -- merge ------------------------------------------------------------------------------
    def merge(self, names: Iterable[str] | None = None) -> None:
        """Fold the given (default: all enabled) adapters into the base weights, at their weights."""
        names = self._enabled_names() if names is None else list(names)
        for name in names:
            self._check_name(name)
        for name in names:  # all or nothing: a refusal (4-bit base, nonlinear adapter) merges none
            for _, wrapper in self.wrappers(name):
                wrapper.adapters[name].check_mergeable(wrapper.base_layer)
        for name in names:
            for _, wrapper in self.wrappers(name):
                wrapper.merge(name)

    def unmerge(self) -> None:
        """Undo every merge; base weights come back bit-exactly."""
        for _, wrapper in self.wrappers():
            wrapper.unmerge_all()

    def unload(self, merge: bool = True) -> nn.Module:
        """Remove every wrapper (merging the enabled adapters first if `merge`); returns the plain model."""
        if merge:
            self.merge()
        for module_name, wrapper in list(self.wrappers()):
            wrapper.release_fused()
            if not merge:
                wrapper.unmerge_all()
            wrapper.merged.clear()
            self._replace(module_name, wrapper.base_layer)
        self.configs.clear()
        return self.model

    # -- save / load ------------------------------------------------------------------------
    def state_dict(self, name: str = "default") -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors, keyed "<module name>.<tensor name>"."""
        self._check_name(name)
        return {
            f"{module_name}.{key}": value
            for module_name, wrapper in self.wrappers(name)
            for key, value in wrapper.adapters[name].state_dict().items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], name: str = "default") -> None:
        """Copy tensors into adapter `name`, checking that every module and shape matches first."""
        expected = self.state_dict(name)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            module = unexpected[0].rsplit(".", 1)[0]
            raise AdapterError(
                f"the checkpoint has weights for module {module!r} ({len(unexpected)} tensors in all) that adapter "
                f"{name!r} on this model does not have; was it trained on another base model or with other targets?"
            )
        if missing:
            raise AdapterError(
                f"the checkpoint lacks {missing[0]!r} ({len(missing)} tensors missing); it does not "
                f"match adapter {name!r}: "
                "was it trained on another base model, another method, or with other targets?"
            )
        for key in expected:  # model order, so the first mismatch reported is the first in the model
            value = state[key]
            if tuple(value.shape) != tuple(expected[key].shape):
                raise AdapterError(
                    f"module {key.rsplit('.', 1)[0]!r}: {key.rsplit('.', 1)[1]} has shape {tuple(value.shape)} in the "
                    f"checkpoint but {tuple(expected[key].shape)} in this model; was the adapter "
                    "trained on another base model?"
                )
        with torch.no_grad():
            for key, value in state.items():
                expected[key].copy_(value)
        for _, wrapper in self.wrappers(name):
            wrapper.release_fused()  # resident state must be rebuilt from the new tensors

    def save(self, directory: str | os.PathLike, name: str = "default") -> Path:
        """Write adapter `name` as <directory>/adapter_config.json + adapter_model.safetensors."""
        self._check_name(name)
        return write_adapter(directory, self.configs[name], name, self.state_dict(name))

    def export(self, directory: str | os.PathLike, format: str = "peft", name: str = "default", **options) -> Path:
        """Write adapter `name` in another library's format ("peft" or "diffusers"); see peft_core.export."""
        return export_adapter(self, directory, format=format, name=name, **options)

    # -- plumbing ---------------------------------------------------------------------------
    def wrappers(self, name: str | None = None) -> Iterator[tuple[str, AdaptedModule]]:
        """(module name, wrapper) for every adapted module (that holds adapter `name`, if given)."""
        for module_name, module in self.model.named_modules():
            if isinstance(module, AdaptedModule) and (name is None or name in module.adapters):
                yield module_name, module

    def _enabled_names(self) -> list[str]:
        disabled = {n for _, w in self.wrappers() for n in w.disabled}
        return [name for name in self.configs if name not in disabled]

    def _check_name(self, name: str) -> None:
        if name not in self.configs:
            raise AdapterError(f"no adapter named {name!r}; this model has {self.adapter_names or 'none'}")

    def _wrapper(self, module_name: str, create: bool) -> AdaptedModule | None:
        module = self.model.get_submodule(module_name)
        if isinstance(module, AdaptedModule):
            return module
        if not create:
            return None
        wrapper = AdaptedModule(module)
        self._replace(module_name, wrapper)
        return wrapper

    def _replace(self, module_name: str, new_module: nn.Module) -> None:
        parent_name, _, child_name = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child_name, new_module)


def _check_prepared(spec: MethodSpec, module_names: list[str], prepared: Mapping[str, Any] | None) -> None:
    if not spec.needs_data:
        if prepared is not None:
            raise AdapterError(f"method {spec.name!r} has no prepare step; attach it without `prepared`")
        return
    if prepared is None:
        raise AdapterError(
            f"method {spec.name!r} must look at data before it attaches: run "
            f"peft_core.methods.{spec.name}.prepare(model, config, batches) and pass its result as `prepared=`"
        )
    missing = [module_name for module_name in module_names if module_name not in prepared]
    extra = sorted(set(prepared) - set(module_names))
    if missing or extra:
        which = (
            f"has nothing for {missing[0]!r}"
            if missing
            else f"was made for {extra[0]!r}, which these targets do not select"
        )
        raise AdapterError(
            f"{spec.name}: the prepared data {which} ({len(missing)} missing, {len(extra)} extra); "
            "run prepare with the same config on this model"
        )


def check_fits(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The names of the modules `config` targets in `model`, once each passes its method's
    `Adapter.check_fits` (a rank no larger than the layer allows), checked from shapes alone: nothing is
    built, so it costs no memory and works on a model made on the meta device. AdapterError otherwise.

    `attach` does not call it (a LoRA rank above a small layer's is wasteful, not wrong, and costs what
    it asks for); the studio calls it before attaching anything, where a rank of 100000 must be a one-line
    error and not the kernel killing the process for memory."""
    spec = get_method(config.method)
    module_names = find_targets(model, config.targets, config.exclude, spec.capabilities.wraps)
    for module_name in module_names:
        module = model.get_submodule(module_name)
        base = module.base_layer if isinstance(module, AdaptedModule) else module
        spec.adapter_class.check_fits(base, config, module_name)
    return module_names


def get_handle(model: nn.Module) -> AdapterHandle | None:
    return getattr(model, "_peft_core_handle", None)


def attach(
    model: nn.Module,
    config: AdapterConfig,
    name: str = "default",
    weight: float = 1.0,
    trainable: bool = True,
    prepared: Mapping[str, Any] | None = None,
) -> AdapterHandle:
    """Add adapter `name` described by `config` to `model` (in place) and return the model's handle.

    Methods with a prepare step need its result: `attach(model, config, prepared=prepare(model, config, batches))`.
    """
    handle = get_handle(model)
    if handle is None:
        handle = AdapterHandle(model)
        object.__setattr__(model, "_peft_core_handle", handle)  # a plain attribute, not a submodule
    return handle.add(config, name=name, weight=weight, trainable=trainable, prepared=prepared)


def _prepared_from_state(
    model: nn.Module, config: AdapterConfig, state: dict[str, torch.Tensor]
) -> dict[str, Any] | None:
    """For methods with a prepare step: each module's `prepared` entry, rebuilt from the checkpoint's shapes."""
    spec = get_method(config.method)
    if not spec.needs_data:
        return None
    adapter_class = spec.adapter_class
    prepared = {}
    for module_name in find_targets(model, config.targets, config.exclude, spec.capabilities.wraps):
        prefix = module_name + "."
        module_state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        if not module_state:
            raise AdapterError(
                f"the checkpoint has no {spec.name} tensors for module {module_name!r}; it does not match this model"
            )
        module = model.get_submodule(module_name)
        base = module.base_layer if isinstance(module, AdaptedModule) else module
        prepared[module_name] = adapter_class.prepared_from_state(module_state, base, config)
    return prepared


def load(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str | None = None,
    weight: float = 1.0,
    trainable: bool = False,
) -> AdapterHandle:
    """Attach the adapter saved in `directory` to `model` and load its weights (all-or-nothing)."""
    config, saved_name = read_adapter_config(directory)
    state = read_adapter_weights(directory)
    name = name or saved_name
    prepared = _prepared_from_state(model, config, state)
    handle = attach(model, config, name=name, weight=weight, trainable=trainable, prepared=prepared)
    try:
        handle.load_state_dict(state, name=name)
    except AdapterError:
        handle.remove(name)  # leave the model as it was
        raise
    return handle
