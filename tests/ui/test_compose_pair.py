"""The Generate & compose tab's second section without a browser or a worker: a content run and a style
run become `studio compose --content RUN:W --style RUN:W` with the compose form's flags (sum or
ZipLoRA and its advanced options), a missing run is refused before anything runs, and the app builds
with the form's ZipLoRA fields folded into an accordion."""

from __future__ import annotations

import pytest

from studio import api
from studio.cli import parse
from studio.errors import UserError
from studio.runs import Run
from ui.studio import FORM_OPTIONS, NO_ADAPTER, Studio, command_argv, form_values

PAIR_FIELDS = {"combine", "prompt", "seed", "zip_steps", "zip_lr", "zip_similarity", "zip_batch", "zip_seed"}


@pytest.fixture
def studio(tmp_path):
    app = Studio(tmp_path / "ws")
    yield app
    app.jobs.shutdown()


def finished(studio: Studio, name: str, kind: str) -> None:
    run = Run.create(studio.workspace.runs, name, kind=kind, config={})
    run.update(status="finished")
    run.release()


def test_a_content_and_a_style_run_become_the_compose_command(studio):
    finished(studio, "content-moon", "train-content")
    finished(studio, "style-neon", "train-style")
    runs, out = studio.workspace.runs, studio.workspace.new_output()
    # As the form holds them: a Number's float, the prompt as lines.
    values = {"combine": "ziplora", "zip_steps": 3.0, "prompt": "a moon in neon style", "seed": 0}
    argv = studio.compose_pair_argv(("content-moon", 1.0), ("style-neon", 0.8), values, out)
    assert argv == [
        "compose",
        "--content",
        f"{runs / 'content-moon'}:1.0",
        "--style",
        f"{runs / 'style-neon'}:0.8",
        "--prompt",
        "a moon in neon style",
        "--zip-steps",
        "3",
        "--combine",
        "ziplora",
        "--out",
        str(out),
    ]
    args = api.check_command(argv)  # what run_light checks before it queues the job
    assert (args.combine, args.zip_steps, args.zip_lr, args.content, args.style) == (
        "ziplora",
        3,
        0.01,
        f"{runs / 'content-moon'}:1.0",
        f"{runs / 'style-neon'}:0.8",
    )
    # sum is the default: no --combine flag; every other option at its default adds nothing.
    summed = studio.compose_pair_argv(
        ("content-moon", 0.5), ("style-neon", 1), {"prompt": "a\nb", "combine": "sum"}, out
    )
    assert summed[5:] == ["--prompt", "a", "--prompt", "b", "--out", str(out)]
    assert parse(summed).combine == "sum" and summed[2].endswith(":0.5") and summed[4].endswith(":1.0")


def test_compose_pair_refuses_a_missing_run_a_prompt_or_an_option_it_does_not_show(studio):
    finished(studio, "content-moon", "train-content")
    finished(studio, "style-neon", "train-style")
    out = studio.workspace.new_output()
    values = {"prompt": "a moon"}
    for content, style, missing in [
        (None, "style-neon", "pick a content run"),
        ("content-moon", "", "pick a style run"),
        (NO_ADAPTER, None, "pick a content and a style run"),
    ]:
        with pytest.raises(UserError, match=missing):
            studio.compose_pair_argv((content, 1.0), (style, 1.0), values, out)
    with pytest.raises(UserError, match="no run named 'gone'"):
        studio.compose_pair_argv(("content-moon", 1.0), ("gone", 1.0), values, out)
    with pytest.raises(UserError, match="write a prompt"):
        studio.compose_pair_argv(("content-moon", 1.0), ("style-neon", 1.0), {"combine": "ziplora"}, out)
    with pytest.raises(UserError, match="style weight must be a finite number"):
        studio.compose_pair_argv(("content-moon", 1.0), ("style-neon", float("nan")), values, out)
    # Server-side and B4M-only options are not this form's: --save-merged, --out, --b4m's factor weights.
    for other in ("save_merged", "out", "content_weight", "b4m", "steps"):
        with pytest.raises(UserError, match="has no option"):
            studio.compose_pair_argv(("content-moon", 1.0), ("style-neon", 1.0), {**values, other: "x"}, out)
    with pytest.raises(UserError, match="whole number"):
        studio.compose_pair_argv(("content-moon", 1.0), ("style-neon", 1.0), {**values, "zip_steps": 2.5}, out)
    assert studio.jobs.jobs() == []


def test_compose_pair_runs_the_command_it_shows(studio, monkeypatch):
    finished(studio, "content-moon", "train-content")
    finished(studio, "style-neon", "train-style")
    ran: list[list[str]] = []
    timeouts: list[float] = []

    def run_light(argv, owner="", timeout=600.0):
        ran.append(argv)
        timeouts.append(timeout)

    monkeypatch.setattr(studio, "run_light", run_light)
    image, command = studio.compose_pair(("content-moon", 1.0), ("style-neon", 1.2), {"prompt": "a moon"})
    assert command == api.command_line(ran[0]) and ran[0][-2:] == ["--out", image]
    assert command.startswith("studio compose --content ") and "style-neon:1.2" in command
    studio.compose_pair(("content-moon", 1.0), ("style-neon", 1.2), {"prompt": "a moon", "combine": "ziplora"})
    assert timeouts[0] == 600.0 and timeouts[1] > 600.0  # the merge trains first: a longer wait


def test_the_pair_form_is_a_second_form_of_compose_beside_break_for_makes():
    assert set(FORM_OPTIONS["compose-pair"]) == PAIR_FIELDS
    assert form_values("compose-pair", {"zip_steps": 3.0, "combine": "ziplora"}) == {
        "zip_steps": 3,
        "combine": "ziplora",
    }
    # The Break-for-Make form (ui/tabs/b4m.py) keeps its fields, and the pair's are not its.
    assert form_values("compose", {"content_weight": 0.5}) == {"content_weight": 0.5}
    with pytest.raises(UserError, match="has no option"):
        form_values("compose", {"zip_steps": 3})
    assert command_argv(["compose", "--b4m", "r"], {"prompt": "a"}) == ["compose", "--b4m", "r", "--prompt", "a"]
    with pytest.raises(ValueError, match="of `studio compose`"):
        command_argv(["generate"], {"prompt": "a"}, form="compose-pair")


def test_the_app_builds_with_the_pair_form(studio):
    gr = pytest.importorskip("gradio", reason="the UI needs gradio: pip install 'peft-studio[ui]'")
    from ui.app import build_app

    app = build_app(studio)
    form = app.forms["compose-pair"]
    assert form.command == "compose" and set(form.components) == set(form.controls) == PAIR_FIELDS
    assert "compose" in app.forms and "content_weight" in app.forms["compose"].components  # B4M's, unchanged

    def accordions(component) -> list[str]:
        found, parent = [], component.parent
        while parent is not None:
            if isinstance(parent, gr.Accordion):
                found.append(parent.label)
            parent = parent.parent
        return found

    for name, component in form.components.items():
        where = accordions(component)
        assert where[-1] == "Compose a content run and a style run", name
        assert ("More ZipLoRA options" in where) == name.startswith("zip_"), name  # advanced: folded away
    assert form.components["zip_steps"].elem_id == "compose-pair-zip-steps"
    endpoints = {fn.api_name for fn in app.fns.values()}
    assert {"compose", "compose_pair", "compose_pair_runs", "generate"} <= endpoints


def test_a_quick_job_that_runs_too_long_is_stopped_with_a_message(studio, monkeypatch):
    cancelled = []

    def too_long(job_id, timeout=None):
        raise TimeoutError(f"job {job_id} still running after {timeout} s")

    monkeypatch.setattr(studio.jobs, "submit", lambda argv, lane, owner: type("J", (), {"id": "j1"})())
    monkeypatch.setattr(studio.jobs, "wait", too_long)
    monkeypatch.setattr(studio.jobs, "cancel", cancelled.append)
    with pytest.raises(UserError, match="ran longer than 10 minutes and was stopped"):
        studio.run_light(["generate", "--prompt", "a star"], timeout=600.0)
    assert cancelled == ["j1"]
