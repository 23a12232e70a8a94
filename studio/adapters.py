"""The adapter options every training command shares: which peft_core method, with which hyperparameters.

    --method paca --rank 16 --alpha 32 --targets to_q to_v --set dropout=0.1
    adapter: {method: paca, rank: 16, alpha: 32, dropout: 0.1}          # the same in YAML

`--rank` and `--alpha` are the method's `r` and `alpha` where it has them; any other hyperparameter
is `--set KEY=VALUE` or a key of the YAML `adapter:` mapping, checked by the method's own config.
Defaults come from the method (its `trainer_defaults` for this trainer) and targets, when none are
given, from the model: the trainer's candidate modules that the method can wrap.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import yaml
from torch import nn

from peft_core import AdapterConfig, config_from_dict, get_method
from peft_core.errors import AdapterError
from pipelines.errors import UserError
from pipelines.options import option
from studio.options import Section


def method_names() -> list[str]:
    from peft_core import available_methods

    return available_methods()


@dataclass
class AdapterOptions:
    method: str = option(
        "lora",
        help="peft_core method",
        choices=method_names,
        choices_message="unknown method {value!r}; available methods: {choices} (LoRAM trains an LLM on its pruned "
        "copy: studio train-llm --loram-ratio R)",
    )
    rank: int | None = option(
        None, help="the method's rank r (LoRA rank, PaCA columns, PLP rank; default: the method's)", min=1
    )
    alpha: float | None = option(None, help="scale numerator alpha (LoRA, PaCA, CorDA; default: the method's)", above=0)
    targets: list[str] | None = option(
        None, help="module names/patterns to adapt (default: what the method can wrap among the trainer's candidates)"
    )
    set: list[str] = option(
        [],
        help="any other method hyperparameter, e.g. --set dropout=0.1 --set use_rslora=true",
        repeat=True,
        metavar="KEY=VALUE",
        label="Other hyperparameters (KEY=VALUE per line)",
    )
    # Hyperparameters given as YAML keys of the `adapter:` mapping (and, once parsed, by --set).
    hyperparameters: dict[str, Any] = option({}, help="other hyperparameters of the method", cli=False, ui=False)

    def __post_init__(self) -> None:
        self.hyperparameters = dict(self.hyperparameters or {})
        for item in self.set:
            key, separator, raw = item.partition("=")
            if not separator:
                raise UserError(f"--set expects KEY=VALUE, got {item!r}")
            value = yaml.safe_load(raw)
            # YAML 1.1 reads "1e-3" as text; on the command line it is plainly a number.
            self.hyperparameters[key.strip()] = _number(value) if _number(value) is not None else value
        self.set = []


def _number(value: Any) -> float | None:
    """`value` as a finite float when it is text that reads as one ("1e-3"), else None."""
    if not isinstance(value, str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _yaml_number_hint(message: str, values: dict[str, Any]) -> str:
    """The YAML hint for a hyperparameter written 1e-3 (text to YAML 1.1) where a number is expected."""
    for key, value in values.items():
        number = _number(value)
        if number is not None and f"key {key!r} expects" in message:
            text = repr(number)
            mantissa, _, exponent = text.partition("e")
            written = f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else text
            return f" (YAML reads {value} as text: write {written})"
    return ""


def adapter_section(trainer: str) -> Section:
    return Section("adapter", AdapterOptions, title="adapter method", extras_field="hyperparameters")


def trainer_defaults(method: str, trainer: str) -> dict[str, Any]:
    """The method's own defaults for `trainer` ("llm" or "diffusion"), over its paper defaults."""
    try:
        return dict(get_method(method).capabilities.trainer_defaults.get(trainer, {}))
    except AdapterError as error:
        raise UserError(str(error)) from None


def adapter_config(options: AdapterOptions, trainer: str, default_targets: list[str]) -> AdapterConfig:
    """The method's config: its trainer defaults < the given hyperparameters < --rank/--alpha/--targets."""
    defaults = trainer_defaults(options.method, trainer)
    values: dict[str, Any] = {"targets": default_targets, **defaults, **options.hyperparameters}
    for name, key in (("rank", "r"), ("alpha", "alpha"), ("targets", "targets")):
        if getattr(options, name) is not None:
            values[key] = getattr(options, name)
    try:
        fields = {f.name for f in dataclasses.fields(get_method(options.method).config_class) if f.init}
        # A trainer default the method lacks is dropped; a key the user gave that it lacks is an error.
        values = {k: v for k, v in values.items() if k in fields or k in options.hyperparameters}
        if options.rank is not None and "r" not in fields:
            raise UserError(f"method {options.method!r} has no rank r; size it with its own hyperparameters (--set)")
        return config_from_dict({"method": options.method, **values})
    except AdapterError as error:
        raise UserError(f"{error}{_yaml_number_hint(str(error), options.hyperparameters)}") from None


def wrappable_targets(model: nn.Module, candidates: list[str], method: str) -> list[str]:
    """The candidate target names whose modules in `model` the method can wrap.

    A name matching modules of several types (a `proj_in` that is a Linear in one block and a Conv2d
    in another) is replaced by the exact names of the modules the method can wrap."""
    from peft_core.targets import find_targets

    wraps = get_method(method).capabilities.wraps
    chosen: list[str] = []
    for name in candidates:
        try:
            matches = find_targets(model, [name], supported_types=(nn.Module,))
        except AdapterError:
            continue  # this model has no such module
        modules = {full: model.get_submodule(full) for full in matches}
        wrappable = [full for full, m in modules.items() if isinstance(getattr(m, "base_layer", m), wraps)]
        if wrappable and len(wrappable) == len(matches):
            chosen.append(name)
        else:
            chosen.extend(wrappable)
    if not chosen:
        raise UserError(
            f"method {method!r} wraps {', '.join(t.__name__ for t in wraps)} modules, and none of the default targets "
            f"{candidates} is one in this model; name the modules with --targets"
        )
    return chosen
