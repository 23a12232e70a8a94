"""Gradio forms generated from a command's options: one control per option field, never written by hand.

A `studio` command declares its options as sections of dataclass fields (studio/options.py); the
same fields make its flags, its YAML and, here, its form:

    form = Form("train-style", prefix="train")
    with gr.Accordion("Training"):
        form.render("train")                  # a control per field of the "train" section
    form.render_rest()                        # the sections not laid out yet
    ...
    values = form.values(*raw)                # {"train.steps": 600, "adapter.rank": None, ...}
    argv = form.argv(["train-style", data], values)   # studio.options.to_argv: the command that runs

Which control a field gets: bool → Checkbox, choices → Dropdown, int → Number(precision=0), float →
Number, a list → Textbox with one item per line, str → Textbox. A number whose default is None
("the method's rank") is a Textbox left empty: gradio's browser side shows an empty Number as 0.
Its label is the field's `label` metadata or its name (plus its unit, or "one per line" for a list),
its help the control's `info`;
`advanced=True` fields are folded into a closed accordion. Fields with `ui=False` (paths on the
server, devices, run names) or `cli=False` get no control: the Studio fills those in itself.

`Control`, `controls` and `clean_values` need no gradio (the Studio's handlers use them to check a
dict of values coming from a form, a gradio_client caller or a test).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from studio import api
from studio.errors import UserError
from studio.options import Section, base_type, choices_of, to_argv

ROW = 3  # small controls (numbers, dropdowns, checkboxes) side by side


@dataclass(frozen=True)
class Control:
    """One option field of a command, as a form shows it."""

    name: str  # "train.steps"; a top-level field is its bare name ("template")
    section: Section
    field: dataclasses.Field
    kind: Any  # the field's type without `| None`: bool, int, float, str, list[str], ...
    optional: bool  # None is a value (the command's default then decides)

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.kind) is list

    @property
    def item(self) -> Any:
        return (typing.get_args(self.kind) or (str,))[0] if self.is_list else self.kind

    @property
    def choices(self) -> tuple[Any, ...] | None:
        return choices_of(self.field)

    @property
    def default(self) -> Any:
        return self.section.default(self.field)

    @property
    def advanced(self) -> bool:
        return bool(self.field.metadata.get("advanced"))

    @property
    def label(self) -> str:
        meta = self.field.metadata
        if meta.get("label"):
            return meta["label"]
        text = self.field.name.replace("_", " ").capitalize()
        if meta.get("unit"):
            return f"{text} ({meta['unit']})"
        return f"{text} (one per line)" if self.is_list else text

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    def initial(self) -> Any:
        """The default as the control holds it (a list as lines of text)."""
        value = self.default
        if self.is_list:
            return "\n".join(map(str, value or []))
        return "" if value is None and self.kind is str else value

    def clean(self, raw: Any) -> Any:
        """The control's value as the option's type: "" and empty lists become None (the default),
        whole floats become ints for int fields, lines become a list."""
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if self.is_list:
            items = raw.splitlines() if isinstance(raw, str) else list(raw)
            items = [item.strip() if isinstance(item, str) else item for item in items]
            cleaned = [self._scalar(item, self.item) for item in items if item not in ("", None)]
            return cleaned or None
        return self._scalar(raw, self.kind)

    def _scalar(self, raw: Any, kind: Any) -> Any:
        if kind is bool:
            if isinstance(raw, bool) or raw in (0, 1):
                return bool(raw)
            raise UserError(f"{self.name}: expected true or false, got {raw!r}")
        if kind in (int, float):
            try:
                number = float(raw)
            except (TypeError, ValueError):
                raise UserError(f"{self.name}: enter a number, not {raw!r}") from None
            if kind is float:
                return number
            if not number.is_integer():
                raise UserError(f"{self.name}: enter a whole number, not {raw!r}")
            return int(number)
        return raw.strip() if isinstance(raw, str) else raw


def controls(sections: Sequence[Section], only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> list[Control]:
    """The option fields of `sections` that a form shows (ui=True and on the command line), in order;
    `only` / `skip` narrow them by name (a tab that deliberately shows a few options)."""
    wanted, skipped = (None if only is None else set(only)), set(skip)
    found: list[Control] = []
    for section in sections:
        hints = typing.get_type_hints(section.cls)
        for f in section.fields():
            if not (f.metadata.get("ui", True) and f.metadata.get("cli", True)):
                continue
            name = f"{section.key}.{f.name}" if section.key else f.name
            if (wanted is not None and name not in wanted) or name in skipped:
                continue
            kind, optional = base_type(hints[f.name])
            found.append(Control(name, section, f, kind, optional))
    missing = (wanted or set()) - {c.name for c in found}
    if missing:
        raise ValueError(f"no form field(s) {', '.join(sorted(missing))} in these sections")
    return found


def clean_values(fields: Iterable[Control], values: dict[str, Any]) -> dict[str, Any]:
    """{control name: value of the option's type} from a form's raw values. Keys are control names,
    or bare field names where one control has that name; any other key is an error (so nothing the
    form does not show, such as a server path, gets in through a dict)."""
    by_name = {c.name: c for c in fields}
    bare: dict[str, list[str]] = {}
    for name, control in by_name.items():
        bare.setdefault(control.field.name, []).append(name)
    cleaned: dict[str, Any] = {}
    for key, raw in values.items():
        if key in by_name:
            name = key
        elif len(bare.get(key, [])) == 1:
            name = bare[key][0]
        else:
            raise UserError(f"the form has no option {key!r}; its options: {', '.join(by_name)}")
        cleaned[name] = by_name[name].clean(raw)
    return cleaned


def command_controls(command: str, **narrow) -> dict[str, Control]:
    return {c.name: c for c in controls(api.command_sections(command), **narrow)}


class Form:
    """The generated controls of one command's options (`controls`), once rendered in a gradio layout.

    `components` maps each control name to its gradio component; `inputs` lists them in the order
    `values(*raw)` reads them back; `parameters` are readable, unique names for them (a handler's
    signature, hence gradio_client's keyword arguments: the bare field name where it is unique)."""

    def __init__(
        self,
        command: str,
        prefix: str = "",
        only: Iterable[str] | None = None,
        skip: Iterable[str] = (),
        initial: dict[str, Any] | None = None,
        choices: dict[str, Sequence[Any]] | None = None,
    ) -> None:
        self.command = command
        self.sections = api.command_sections(command)
        self.controls = {c.name: c for c in controls(self.sections, only, skip)}
        self.prefix = prefix
        self.initial = dict(initial or {})  # control name -> first value where not the option's default
        self.choices = dict(choices or {})  # control name -> narrower choices than the field's
        self.components: dict[str, Any] = {}
        bare = [c.field.name for c in self.controls.values()]
        self.parameters = {
            name: c.field.name if bare.count(c.field.name) == 1 else name.replace(".", "_")
            for name, c in self.controls.items()
        }

    # -- layout ----------------------------------------------------------------------------------
    def render(self, section: str | None, title: str = "") -> None:
        """The controls of one section (by its YAML key; None: the top-level one) in the current gradio
        context: the main ones in rows, the advanced ones in a closed accordion below them."""
        import gradio as gr

        chosen = [c for c in self.controls.values() if c.section.key == section and c.name not in self.components]
        self._rows([c for c in chosen if not c.advanced])
        advanced = [c for c in chosen if c.advanced]
        if advanced:
            with gr.Accordion(f"More {title or chosen[0].section.title or 'options'}", open=False):
                self._rows(advanced)

    def render_rest(self) -> None:
        """Every section that has controls not laid out yet."""
        for section in self.sections:
            if any(c.section.key == section.key and n not in self.components for n, c in self.controls.items()):
                self.render(section.key)

    def _rows(self, chosen: list[Control]) -> None:
        import gradio as gr

        pending: list[Control] = []
        for control in [*chosen, None]:
            wide = control is not None and _is_text(control, self.choices.get(control.name))
            if pending and (control is None or wide or len(pending) == ROW):
                with gr.Row():
                    for small in pending:
                        self.components[small.name] = self._component(small)
                pending = []
            if wide:
                self.components[control.name] = self._component(control)
            elif control is not None:
                pending.append(control)

    def _component(self, control: Control):
        import gradio as gr

        value = self.initial.get(control.name, control.initial())
        common = {"label": control.label, "info": control.help or None, "elem_id": self._elem_id(control)}
        choices = self.choices.get(control.name) or control.choices
        if control.kind is bool:
            return gr.Checkbox(bool(value), **common)
        if choices is not None and not control.is_list:
            return gr.Dropdown(list(choices), value=value, **common)
        if control.kind in (int, float) and value is not None:
            return gr.Number(value, precision=0 if control.kind is int else None, **common)
        if control.kind in (int, float):  # the browser shows an empty gr.Number as 0: a box can stay empty
            return gr.Textbox("", placeholder="empty: the default", **common)
        lines = 3 if control.is_list else 1
        return gr.Textbox(value, lines=lines, max_lines=12 if control.is_list else 1, **common)

    def _elem_id(self, control: Control) -> str | None:
        if not self.prefix:
            return None
        return f"{self.prefix}-{self.parameters[control.name].replace('_', '-')}"

    # -- values ------------------------------------------------------------------------------------
    @property
    def inputs(self) -> list:
        missing = [name for name in self.controls if name not in self.components]
        if missing:
            raise RuntimeError(f"{self.command} form: controls not laid out: {', '.join(missing)}")
        return [self.components[name] for name in self.controls]

    @property
    def named_inputs(self) -> dict[str, Any]:
        """{parameter name: component}, in `inputs` order."""
        return {self.parameters[name]: component for name, component in zip(self.controls, self.inputs, strict=True)}

    def values(self, *raw: Any) -> dict[str, Any]:
        """{control name: value} from the components' values in `inputs` order, typed (see Control.clean)."""
        return clean_values(self.controls.values(), dict(zip(self.controls, raw, strict=True)))

    def argv(self, command_words: list[str], values: dict[str, Any]) -> list[str]:
        """The `studio` argv: `command_words`, then a flag per value that differs from its default."""
        return to_argv(command_words, self.sections, clean_values(self.controls.values(), values))

    def defaults_of(self, command: str) -> dict[str, Any]:
        """{control name: first value} of these controls under `command`'s defaults (a command with the
        same options and other defaults: train-content's sample prompts beside train-style's)."""
        other = command_controls(command)
        return {name: other[name].initial() for name in self.controls if name in other}


def _is_text(control: Control, choices: Sequence[Any] | None = None) -> bool:
    """Controls that take a row of their own: free text and lists."""
    return control.kind not in (bool, int, float) and (control.is_list or (choices or control.choices) is None)
