"""The UI's forms come from the option fields that define the CLI: each training form's controls are
exactly the command's `ui=True` fields, no option has a hand-written control, and a form's values
become an argv that `studio.cli.parse` reads back to the same options (the command a form previews
is the command that runs)."""

from __future__ import annotations

import pytest

from studio import api
from studio.cli import parse
from studio.errors import UserError
from studio.options import resolve_section
from ui.forms import Control, clean_values, controls

gr = pytest.importorskip("gradio", reason="the UI needs gradio: pip install 'peft-studio[ui]'")

from ui.app import build_app  # noqa: E402
from ui.forms import Form  # noqa: E402
from ui.studio import DEMO, LLM_EMBEDDED, Studio  # noqa: E402

TRAINING = ("train-style", "train-content", "train-llm", "break-for-make")
# The app's form of each training command (train-style and train-content share one: same options).
APP_FORM = {"train-style": "train-style", "train-content": "train-style", "train-llm": "train-llm"}
# The page's own inputs, none of them an option field: where the data comes from, run names and
# picks (the browser names runs, never paths), and generate's adapters (and compose's content and style
# runs) as finished runs + weights.
PAGE_INPUTS = {
    "What to learn",
    "Training images",
    "Shipped demo set",
    "Images with .txt captions or a metadata.jsonl",
    "Run name (optional)",
    "Content set",
    "...or upload content images",
    "Style set",
    "...or upload style images",
    "Run",
    "Adapter 1",
    "Adapter 2",
    "Adapter 3",
    "Weight",
    "Content run",
    "Style run",
    "Training data",
    "Training data: JSONL, JSON, CSV or Parquet, any format (messages, sharegpt, alpaca, prompt-completion, text; "
    "prompt + chosen + rejected for dpo / orpo)",
    "Held-out data (optional; choices + answer give accuracy, chosen + rejected preference accuracy)",
    "Adapter (a finished run)",
    "Yes, delete this run folder for good",
}
INPUT_TYPES = (gr.Number, gr.Textbox, gr.Checkbox, gr.Dropdown, gr.Radio, gr.Slider, gr.File)


def ui_fields(command: str) -> set[str]:
    """Every field of the command's sections that the UI may show, by the metadata alone."""
    return {
        f"{section.key}.{f.name}" if section.key else f.name
        for section in api.command_sections(command)
        for f in section.fields()
        if f.metadata.get("ui", True)
    }


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    app = Studio(tmp_path_factory.mktemp("forms") / "ws")
    yield app
    app.jobs.shutdown()


@pytest.fixture(scope="module")
def app(studio):
    return build_app(studio)


def rendered(command: str) -> Form:
    with gr.Blocks():
        form = Form(command)
        form.render_rest()
    return form


@pytest.mark.parametrize("command", TRAINING)
def test_each_training_form_shows_exactly_the_commands_ui_fields(app, command):
    wanted = ui_fields(command)
    assert wanted and "data" not in wanted and "runs_dir" not in wanted and "name" not in wanted
    form = app.forms[APP_FORM.get(command, command)]
    assert set(form.components) == set(form.controls) == wanted
    for name, component in form.components.items():
        control = form.controls[name]
        assert component.label == control.label and component.info == (control.help or None)
        expected = (
            gr.Checkbox
            if control.kind is bool
            else gr.Dropdown
            if control.choices is not None and not control.is_list
            else gr.Number
            if control.kind in (int, float) and control.default is not None
            else gr.Textbox  # text, lists, and numbers that start empty (gradio shows an empty Number as 0)
        )
        assert type(component) is expected, (name, type(component))
        if control.kind is int and control.default is not None:
            assert component.precision == 0


def test_no_option_has_a_hand_written_control(app):
    generated = {id(c) for form in app.forms.values() for c in form.components.values()}
    hand_written = {
        block.label
        for block in app.blocks.values()
        if isinstance(block, INPUT_TYPES) and id(block) not in generated and block.interactive is not False
    }
    assert hand_written == PAGE_INPUTS
    labels = {control.label for form in app.forms.values() for control in form.controls.values()}
    assert not hand_written & labels


def changed(control: Control):
    """A valid value other than the default, as the control would hold it (lists as lines)."""
    default, meta = control.default, control.field.metadata
    if control.name == "adapter.set":
        return "dropout=0.1\nuse_rslora=true"
    if control.is_list:
        return "first item\nsecond item"
    if control.kind is bool:
        return not default
    if control.choices is not None:
        return next(choice for choice in control.choices if choice != default)
    if control.kind is int:
        value = (default if default is not None else meta.get("min") or 1) + (meta.get("multiple_of") or 1)
        return float(value)  # a Number's float: the form makes it an int
    if control.kind is float:
        return default * 2 if default else 0.5
    return "a {caption} by {trigger}"


@pytest.mark.parametrize("command", TRAINING)
def test_form_values_to_argv_parse_back_to_the_same_options(command):
    form = rendered(command)
    raw = [changed(control) for control in form.controls.values()]
    values = form.values(*raw)
    assert all(values[name] != control.default for name, control in form.controls.items())
    argv = form.argv([command], values)
    parsed = parse(argv)
    for section in form.sections:
        given = {c.field.name: values[name] for name, c in form.controls.items() if c.section.key == section.key}
        assert parsed.options[section.key] == resolve_section(section, given), section.key
    assert parse(form.argv([command], form.values(*(c.initial() for c in form.controls.values())))).options == (
        parse([command]).options
    )  # the untouched form is the bare command


def started(studio, monkeypatch) -> list[list[str]]:
    """The argv of every job the Studio queues (recorded instead of run)."""
    queued: list[list[str]] = []

    def submit(argv, **kwargs):
        queued.append(list(argv))
        return type("Queued", (), {"id": f"job-{len(queued)}"})()

    monkeypatch.setattr(studio.jobs, "submit", submit)
    return queued


# Values that must make sense together to pass each command's own checks, not only its parser's
# (a template needs its trigger, an NF4 base a GPU, LoRAM a ratio below 1 ...).
TOGETHER = {
    "template": "",
    "trigger": "",
    "adapter.targets": "",
    "adapter.set": "dropout=0.1",
    "train.mixed_precision": "no",
    "train.optimizer": "adamw",
    "train.cuda_graph": "auto",
    "train.load_in_4bit": False,
    "train.loram_ratio": 0.0,
}


def training_values(command: str) -> dict:
    """A value for every option of the command's form, changed from its default where that is valid."""
    form = rendered(command)
    values = {name: changed(c) for name, c in form.controls.items() if name != "adapter.method"}
    return {name: TOGETHER.get(name, value) for name, value in values.items()}


@pytest.mark.parametrize("kind", ["style", "content"])
def test_the_previewed_training_command_is_the_one_that_runs(studio, monkeypatch, kind):
    queued = started(studio, monkeypatch)
    values = training_values(f"train-{kind}")
    demo = api.default_demo_set(kind)
    command, yaml_text = studio.preview_training(kind, DEMO, demo, "same", values)
    _, status, shown, shown_yaml = studio.start_training(kind, DEMO, demo, None, "same", values)
    assert "queued **same**" in status and command == shown == api.command_line(queued[0]) and yaml_text == shown_yaml
    # Every method trains from train-*: a data-step method (CorDA) is queued like any other, and a
    # hyperparameter it lacks (the form's dropout=0.1) is refused before queueing.
    with pytest.raises(UserError, match="unknown key 'dropout' in a 'corda' config"):
        studio.start_training(kind, DEMO, demo, None, "corda", {**values, "method": "corda"})
    without_set = {name: value for name, value in values.items() if name.rpartition(".")[2] != "set"}
    studio.start_training(kind, DEMO, demo, None, "corda", {**without_set, "method": "corda"})
    assert len(queued) == 2 and parse(queued[1]).options["adapter"].method == "corda"
    parsed = parse(queued[0])
    assert parsed.options["train"].steps == int(changed(rendered(f"train-{kind}").controls["train.steps"]))
    assert parsed.options["adapter"].hyperparameters == {"dropout": 0.1}


def test_the_previewed_llm_and_b4m_commands_are_the_ones_that_run(studio, monkeypatch):
    queued = started(studio, monkeypatch)
    values = training_values("train-llm")
    command, yaml_text = studio.preview_llm(LLM_EMBEDDED, "llm-same", values)
    _, status, shown, shown_yaml = studio.start_llm(LLM_EMBEDDED, None, None, "llm-same", values)
    assert "queued **llm-same**" in status and command == shown == api.command_line(queued[0])
    assert yaml_text == shown_yaml and parse(queued[0]).options["train"].loram_ratio == 0.0

    values = training_values("break-for-make")
    command, yaml_text = studio.preview_b4m("content-moon", "style-neon", None, None, "b4m-same", values)
    _, status, shown, shown_yaml = studio.start_b4m("content-moon", "style-neon", None, None, "b4m-same", values)
    assert "queued **b4m-same**" in status and command == shown == api.command_line(queued[1])
    assert yaml_text == shown_yaml and parse(queued[1]).options["b4m"].rank == int(values["b4m.rank"])


def test_values_are_typed_and_checked_like_the_cli():
    fields = controls(api.command_sections("train-style"))
    values = clean_values(
        fields,
        {"steps": 3.0, "rank": "", "template": "  a {caption}  ", "sample_prompts": "a\n\n b \n", "set": ""},
    )
    assert values == {
        "train.steps": 3,
        "adapter.rank": None,
        "template": "a {caption}",
        "train.sample_prompts": ["a", "b"],
        "adapter.set": None,
    }
    assert clean_values(fields, values) == values  # the Studio cleans again: nothing changes
    with pytest.raises(UserError, match="whole number"):
        clean_values(fields, {"train.steps": 2.5})
    with pytest.raises(UserError, match="enter a number"):
        clean_values(fields, {"learning_rate": "fast"})
    for server_side in ("data", "runs_dir", "name", "device", "no_such_option"):
        with pytest.raises(UserError, match="has no option"):
            clean_values(fields, {server_side: "x"})
