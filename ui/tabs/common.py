"""What every tab needs: errors as messages, the browser session as a job's owner, the loss plot,
the live command/YAML preview beside a form, and the method help text."""

from __future__ import annotations

import functools
import inspect
import keyword
from collections.abc import Callable
from typing import Any

from studio import api
from studio.errors import UserError
from ui.forms import Form


def guarded(function: Callable) -> Callable:
    """Show UserErrors as a message in the page rather than a stack trace."""
    import gradio as gr

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except UserError as error:
            raise gr.Error(str(error), print_exception=False) from None

    return wrapper


def owner_of(request: Any) -> str:
    """Who asks: the logged-in user (with a login every user has their own runs and jobs), else the
    browser session (without a login everything is shared; the session only counts queued jobs)."""
    return getattr(request, "username", None) or getattr(request, "session_hash", None) or ""


def with_owner(function: Callable, named: dict[str, Any]) -> tuple[Callable, list]:
    """(handler, inputs) calling function(*values, owner=<browser session>).

    gradio injects a gr.Request only into a named positional parameter, so the handler's signature is
    spelled out: one parameter per entry of `named` (parameter name: component), then the request.
    gradio_client callers thus pass the form's options by name (`steps=2, rank=4`), and only those
    they change."""
    import gradio as gr

    names = list(named)
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name) or name == "request":
            raise ValueError(f"{name!r} cannot name a handler parameter")

    def handler(*values):
        *inputs, request = values
        return function(*inputs, owner=owner_of(request))

    # Default None: a gradio_client caller may leave out an option whose control starts empty (an
    # empty rank: the method's own); the others default to their control's first value.
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    handler.__signature__ = inspect.Signature(
        [inspect.Parameter(n, positional, default=None) for n in names]
        + [inspect.Parameter("request", positional, default=None, annotation=gr.Request)]
    )
    handler.__annotations__ = {"request": gr.Request}
    handler.__name__ = function.__name__  # the default API name
    return guarded(handler), list(named.values())


def plot_frame(points: dict, stages: tuple[str, ...] = ()):
    """The loss plot's frame: typed columns (an empty frame is numeric too, so the plot's axes are), and
    one empty row per name in `stages`. Gradio's plot fixes its colour scale when it first draws and
    afterwards only swaps the data, so every stage a run will log must be in the frame from the start
    (Break-for-Make: break-content, break-style, make) or the later stages are never drawn."""
    import pandas as pd

    frame = pd.DataFrame(
        {
            "step": pd.Series([*points["step"], *[None] * len(stages)], dtype="Int64"),
            "loss": pd.Series([*points["loss"], *[None] * len(stages)], dtype="float64"),
            "stage": pd.Series([*points["stage"], *stages], dtype="object"),
        }
    )
    return frame


def wire_run_list(app, tab, refresh, dropdown, runs: Callable[[str], Any], api_name: str) -> None:
    """Fill `dropdown` with runs(owner) when the page loads, when `tab` opens and when `refresh` is clicked
    (only the click is part of the app's API, as `api_name`)."""
    refresh.click(*with_owner(runs, {}), dropdown, api_name=api_name)
    tab.select(*with_owner(runs, {}), dropdown, api_visibility="private")
    app.load(*with_owner(runs, {}), dropdown, api_visibility="private")


def live_preview(app, preview: Callable, form: Form, page_inputs: list, outputs: list) -> None:
    """Show preview(*page values, form values) in `outputs` on load and whenever an input changes;
    a value the form cannot read (2.5 steps) shows as "# <the error>" like any other refusal."""
    import gradio as gr

    def show(*values):
        page, raw = values[: len(page_inputs)], values[len(page_inputs) :]
        try:
            options = form.values(*raw)
        except UserError as error:
            return f"# {error}", ""
        return preview(*page, options)

    inputs = [*page_inputs, *form.inputs]
    gr.on([c.change for c in inputs], show, inputs, outputs, show_progress="hidden")
    app.load(show, inputs, outputs)


def method_text(method: str, trainer: str) -> str:
    """What the method starts from in this trainer, and its note."""
    defaults = api.adapter_defaults(method, trainer)
    shown = ", ".join(f"`{k}={v!r}`" for k, v in defaults.items())
    sizes = (
        "Rank and alpha (empty: these defaults) are its `r` and `alpha`."
        if "r" in defaults
        else "It has no rank r: size it with its own hyperparameters (KEY=VALUE)."
    )
    note = api.method_note(method)
    return f"**{method}** starts from {shown}. {sizes}" + (f" {note}" if note else "")


def method_updates(method: str, trainer: str) -> tuple:
    """(rank, alpha, help) after the method changed: rank/alpha greyed out where the method has none,
    their empty boxes hinting the method's own defaults (an empty box means that default)."""
    import gradio as gr

    defaults = api.adapter_defaults(method, trainer)

    def size(key: str):
        if key in defaults:
            return gr.update(interactive=True, placeholder=f"{defaults[key]} (the method's default)")
        return gr.update(interactive=False, value=None, placeholder="(the method has none)")

    return size("r"), size("alpha"), method_text(method, trainer)


def wire_method_help(app, form: Form, help_box, trainer: str) -> None:
    components = form.components
    outputs = [components["adapter.rank"], components["adapter.alpha"], help_box]
    method = components["adapter.method"]
    update = guarded(lambda value: method_updates(value, trainer))
    method.change(update, method, outputs)
    app.load(update, method, outputs)
