"""Upload checking, path sanitising and the UI's handlers, without a browser or a worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from studio import api
from studio.errors import UserError
from studio.options import choices_of
from studio.runs import Run
from ui.command import parse_auth
from ui.studio import Studio
from ui.workspace import UploadLimits, Workspace


@pytest.fixture
def studio(tmp_path):
    app = Studio(tmp_path / "ws")
    yield app
    app.jobs.shutdown()


def uploaded(workspace: Workspace, name: str, data: bytes | None = None, colour=(200, 30, 30)) -> str:
    """A file as gradio leaves it: <cache>/<hash>/<original name>."""
    folder = workspace.cache / os.urandom(4).hex()
    folder.mkdir(parents=True)
    path = folder / name
    if data is None:
        Image.new("RGB", (32, 32), colour).save(path, format="PNG")
    else:
        path.write_bytes(data)
    return str(path)


def test_run_names_from_the_browser_never_leave_the_runs_folder(tmp_path, studio):
    ws = studio.workspace
    Run.create(ws.runs, "good", kind="train-style", config={})
    assert ws.run_dir("good") == ws.runs / "good"
    for bad in ["../good", "good/..", "/etc", "", "a/b", "..", "missing", "good\x00"]:
        with pytest.raises(UserError):
            ws.run_dir(bad)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "run.json").write_text("{}")
    (ws.runs / "sneaky").symlink_to(outside)  # a name that is safe but points elsewhere
    with pytest.raises(UserError, match="outside the workspace"):
        ws.run_dir("sneaky")
    with pytest.raises(UserError, match="outside the workspace"):
        ws.inside(ws.root / ".." / "outside")
    assert studio._served("/etc/passwd") is None and studio._served(str(ws.root / "../outside/run.json")) is None
    assert ws.unique_run_name("good") == "good-2" and ws.unique_run_name("../x y") == "x-y"


def test_uploads_are_checked_sanitised_and_validated_like_the_cli(studio):
    ws = studio.workspace
    limits = UploadLimits(max_file_bytes=10_000, max_files=4)
    files = [
        uploaded(ws, "my cat.png"),
        uploaded(ws, "my cat.txt", b"a cat"),
        uploaded(ws, "two.png", colour=(0, 0, 255)),
        uploaded(ws, "two.txt", b"a blue square"),
    ]
    folder = ws.ingest_upload(files, limits, label="../../style")
    assert folder.parent == ws.uploads and sorted(p.name for p in folder.iterdir()) == [
        "my-cat.png",
        "my-cat.txt",
        "two.png",
        "two.txt",
    ]
    assert api.validate_dataset(folder) == (2, [])

    refusals = {
        "not accepted": [uploaded(ws, "evil.sh", b"rm -rf /")],
        "not accepted ": [uploaded(ws, "data.jsonl", b"{}")],  # only metadata.jsonl
        "over the": [uploaded(ws, "big.png", b"\0" * 20_000)],
        "at most 4": files + [files[0]],
        "outside the workspace": ["/etc/hostname"],  # a server path instead of an upload
        "no files": [],
    }
    for message, bad in refusals.items():
        with pytest.raises(UserError, match=message.strip()):
            ws.ingest_upload(bad, limits)


def test_a_bad_upload_is_refused_before_any_job_and_cleaned_up(studio):
    ws = studio.workspace
    files = [uploaded(ws, "fake.png", b"this is not a picture"), uploaded(ws, "fake.txt", b"caption")]
    with pytest.raises(UserError, match="fake.png"):
        studio.start_training("style", "upload", "", files, "", form_options())
    assert list(ws.uploads.iterdir()) == [] and studio.jobs.jobs() == []
    with pytest.raises(UserError, match="no shipped set"):
        studio.start_training("style", "demo set", "../../etc", None, "", form_options())


def form_options(**changes):
    """The training form's values (the option fields' names; see ui/forms.py)."""
    values = {
        "template": "",
        "trigger": "",
        "method": "lora",
        "rank": 2,
        "alpha": 2.0,
        "set": "",
        "steps": 2,
        "batch_size": 1,
        "learning_rate": 1e-3,
        "lr_schedule": "constant",
        "seed": 0,
        "checkpoint_every": 100,
        "sample_every": 0,
        "sample_prompts": "a star in neon style",
        "sample_steps": 1,
    }
    values.update(changes)
    return values


def test_the_form_becomes_the_cli_command_and_yaml(studio):
    command, yaml_text = studio.preview_training(
        "content", "demo set", "content-moon", "", form_options(set="dropout=0.1")
    )
    assert command.startswith("studio train-content ") and "content-moon" in command and "--set dropout=0.1" in command
    assert "dropout: 0.1" in yaml_text and "steps: 2" in yaml_text
    command, _ = studio.preview_training("style", "demo set", "style-neon", "", form_options(learning_rate=-1))
    assert command.startswith("#") and "learning_rate must be > 0" in command
    with pytest.raises(UserError, match="learning_rate"):
        studio.start_training("style", "demo set", "style-neon", None, "x", form_options(learning_rate=-1))
    with pytest.raises(UserError, match="whole number"):
        studio.training_argv("style", "d", "n", form_options(steps=2.5))
    assert studio.jobs.jobs() == []


def test_runs_tab_actions_are_guarded(studio):
    ws = studio.workspace
    run = Run.create(ws.runs, "done", kind="train-style", config={})
    run.update(status="finished")
    with pytest.raises(UserError, match="nothing to resume"):
        studio.resume("done")
    with pytest.raises(UserError, match="confirmation"):
        studio.delete("done", confirmed=False)
    assert studio.delete("done", confirmed=True) == "deleted done" and not run.directory.exists()
    with pytest.raises(UserError):
        studio.generate_argv(
            [("../done", 1.0)], {"prompt": "a star", "seed": 0, "steps": 2, "guidance": 5.0}, ws.new_output()
        )
    with pytest.raises(UserError, match="not a run name"):
        studio.delete("../../ws", confirmed=True)


def test_auth_parsing(tmp_path):
    assert parse_auth(None, None) is None
    assert parse_auth("ann:s3:cret", None) == [("ann", "s3:cret")]
    users = tmp_path / "users.txt"
    users.write_text("# team\nann:one\n\nbob:two\n")
    assert parse_auth(None, str(users)) == [("ann", "one"), ("bob", "two")]
    for bad in ("ann", ":pw", "ann:"):
        with pytest.raises(UserError, match="USER:PASS"):
            parse_auth(bad, None)
    with pytest.raises(UserError, match="does not exist"):
        parse_auth(None, str(tmp_path / "none.txt"))


def test_tabs_follow_the_commands_that_exist():
    assert api.has_command("train-style") and api.has_command("ui") and not api.has_command("no-such-thing")
    # Every method trains from train-*: CorDA and SPT run their data step on the run's own images.
    method = next(f for s in api.command_sections("train-style") for f in s.fields() if f.name == "method")
    assert {"lora", "paca", "corda", "spt"} <= set(choices_of(method))
    assert set(api.demo_sets("style")) >= {"style-neon"} and all(p.is_dir() for p in api.demo_sets().values())
    assert isinstance(api.train_defaults("style")["rank"], int)
    assert Path(api.demo_sets()[api.default_demo_set("content")]).name == "content-moon"


def llm_options(**changes):
    values = {
        "method": "lora",
        "rank": 4,
        "alpha": 8.0,
        "loram_ratio": 0,
        "set": "",
        "export_peft": False,
        "steps": 2,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 1,
        "max_length": 64,
        "seed": 0,
        "checkpoint_every": 100,
    }
    values.update(changes)
    return values


def test_the_llm_form_becomes_the_train_llm_command_and_yaml(studio, tmp_path):
    import yaml

    command, yaml_text = studio.preview_llm("embedded task", "", llm_options(set="dropout=0.1"))
    assert command.startswith("studio train-llm --runs-dir ") and "--name llm-lora-task_add_train" in command
    assert "--rank 4 --alpha 8.0" in command and "--set dropout=0.1" in command
    config = tmp_path / "run.yaml"  # the YAML shown is a config train-llm reads back to the same job
    config.write_text(yaml_text)
    same = api.config_yaml(["train-llm", "--config", str(config)])
    assert yaml.safe_load(same) == yaml.safe_load(yaml_text) and "dropout: 0.1" in yaml_text
    command, _ = studio.preview_llm("embedded task", "", llm_options(method="compacter", set="n=2"))
    assert "--rank" not in command and "--alpha" not in command  # Compacter has neither
    command, _ = studio.preview_llm("embedded task", "", llm_options(method="paca", loram_ratio=0.5, export_peft=True))
    assert "--loram-ratio 0.5" in command and "--export-peft" in command
    command, _ = studio.preview_llm("upload", "x", llm_options(learning_rate=0))
    assert command.startswith("#") and "learning_rate must be > 0" in command


def test_llm_uploads_and_options_are_checked_before_any_job(studio):
    ws = studio.workspace
    good = uploaded(
        ws, "my data.jsonl", b'{"instruction": "hi", "response": "hello"}\n{"instruction": "bye", "output": "ciao"}\n'
    )
    bad = uploaded(ws, "bad.jsonl", b'{"instruction": "hi"}\nnot json\n')
    refusals = [
        (
            'line 1: an "instruction" row needs an "output" (or "response"); line 2: invalid JSON',
            ("upload", bad, None, llm_options()),
        ),
        ("not accepted", ("upload", uploaded(ws, "data.txt", b"hello"), None, llm_options())),
        ("outside the workspace", ("upload", "/etc/hostname", None, llm_options())),
        ("no file uploaded", ("upload", None, None, llm_options())),
        (
            "LoRAM recovers lora, paca adapters only",
            ("upload", good, None, llm_options(method="corda", loram_ratio=0.5)),
        ),
        (
            "cannot be merged|no exact low-rank form",
            ("upload", good, None, llm_options(method="compacter", export_peft=True)),
        ),
    ]
    for message, (source, train_file, eval_file, options) in refusals:
        with pytest.raises(
            UserError, match=message.replace("(", r"\(").replace(")", r"\)") if "|" not in message else message
        ):
            studio.start_llm(source, train_file, eval_file, "", options)
    assert list(ws.uploads.iterdir()) == [] and studio.jobs.jobs() == []  # refused uploads are deleted, nothing queued


def chat_options(prompt: str, raw: bool = False) -> dict:
    """The chat form's values (raw: continue the prompt as plain text, no chat template)."""
    return {"prompt": prompt, "raw": raw, "max_new_tokens": 8, "temperature": 0.0}


def test_llm_chat_and_export_are_guarded(studio):
    ws = studio.workspace
    Run.create(ws.runs, "style", kind="train-style", config={}).update(status="finished")
    Run.create(ws.runs, "llm", kind="train-llm", config={}).update(status="interrupted")
    with pytest.raises(UserError, match="write a prompt"):
        studio.chat_argv("(the embedded base, no adapter)", chat_options("  "), ws.new_output())
    for run_name in ("style", "llm"):
        with pytest.raises(UserError, match="not a finished LLM run"):
            studio.chat_argv(run_name, chat_options("hello"), ws.new_output())
    with pytest.raises(UserError, match="not a run name"):
        studio.chat_argv("../llm", chat_options("hello"), ws.new_output())
    argv = studio.chat_argv(
        "(the embedded base, no adapter)", chat_options("--help me", raw=True), ws.new_output(".json")
    )
    assert argv[:2] == ["chat", "--prompt=--help me"] and "--raw" in argv  # a prompt is never taken for an option
    assert api.check_command(argv).prompt == ["--help me"]
    with pytest.raises(UserError, match="exports to PEFT while it trains"):
        studio.export("llm", "peft")
    assert studio.resume("llm")  # an interrupted LLM run resumes like a diffusion one
    studio.jobs.cancel(studio.jobs.jobs()[0].id)


def test_llm_uploads_take_every_file_kind_the_trainer_reads(studio, monkeypatch):
    """CSV and JSON files (and Parquet, not built here) are uploads like JSONL: copied, checked row by row,
    queued with their own suffix; a malformed CSV row is named by its row number."""
    queued: list[list[str]] = []
    monkeypatch.setattr(
        studio.jobs, "submit", lambda argv, **kw: queued.append(list(argv)) or type("Q", (), {"id": "job-1"})()
    )
    ws = studio.workspace
    csv = uploaded(ws, "alpaca.csv", b"instruction,input,output\nadd,2 2,4\nadd,3 3,6\n")
    pairs = uploaded(ws, "pairs.json", b'[{"prompt": "2 + 2 ?", "chosen": "4", "rejected": "5"}]')
    _, status, _, _ = studio.start_llm("upload", csv, pairs, "", llm_options())
    assert "queued" in status
    (argv,) = queued
    data = Path(next(a for a in argv if a.endswith(".csv")))
    assert data.is_file() and data.is_relative_to(ws.uploads) and any(a.endswith(".json") for a in argv)
    bad = uploaded(ws, "bad.csv", b"instruction,input,output\nadd,2 2,\n")
    with pytest.raises(UserError, match="row 1"):
        studio.start_llm("upload", bad, None, "", llm_options())


def test_the_upload_route_stores_llm_data_files_and_nothing_else(studio):
    """screen_upload (the guard's check of gradio's upload route): images, captions and every LLM data
    kind are kept; anything else is deleted with the whole upload, and the answer names it."""
    ws = studio.workspace
    kept = [uploaded(ws, name, b"x") for name in ("a.csv", "b.json", "c.parquet", "d.jsonl", "e.txt")]
    assert ws.screen_upload(kept) is None and all(Path(p).exists() for p in kept)
    mixed = [uploaded(ws, "f.csv", b"x"), uploaded(ws, "evil.html", b"<script></script>")]
    message = ws.screen_upload(mixed)
    assert message.startswith("evil.html: not accepted") and ".parquet" in message
    assert not any(Path(p).exists() for p in mixed)
