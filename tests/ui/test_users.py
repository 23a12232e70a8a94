"""The multi-user rules without a browser: each login has its own runs and jobs, files are served
per user and never as HTML, uploads are screened and the upload cache is capped, a page follows and
cancels its jobs from their records, the command previewed with a blank run name is the one queued,
and the Break-for-Make plot names every stage from the start."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from studio.errors import UserError
from studio.runs import Run
from ui.guard import Guard
from ui.progress import B4M_STAGES, loss_points
from ui.studio import DEMO, LLM_EMBEDDED, TRAIN_KINDS, Studio
from ui.workspace import UploadLimits, user_folder

gr = pytest.importorskip("gradio", reason="the UI needs gradio: pip install 'peft-studio[ui]'")

from ui.tabs.common import plot_frame  # noqa: E402


@pytest.fixture
def studio(tmp_path):
    app = Studio(tmp_path / "ws", per_user=True)
    yield app
    app.jobs.shutdown()


def make_run(studio: Studio, name: str, owner: str | None, status: str = "finished", kind: str = "train-style"):
    run = Run.create(studio.workspace.runs, name, kind=kind, config={})
    run.update(status=status)
    run.release()  # as a finished command leaves it: nobody writes it now
    (run.directory / "samples").mkdir()
    Image.new("RGB", (8, 8)).save(run.directory / "samples" / "final.png")
    if owner is not None:
        studio.workspace.set_owner(name, owner)
    return run


def cached(studio: Studio, name: str, data: bytes) -> str:
    """A file as gradio's upload route leaves it: <cache>/<hash>/<name>."""
    folder = studio.workspace.cache / os.urandom(6).hex()
    folder.mkdir(parents=True)
    (folder / name).write_bytes(data)
    return str(folder / name)


def test_each_user_sees_and_touches_only_their_own_runs(studio, tmp_path):
    make_run(studio, "alices", "alice")
    make_run(studio, "bobs", "bob")
    make_run(studio, "llm-of-alice", "alice", kind="train-llm")
    make_run(studio, "b4m-of-alice", "alice", kind="break-for-make")
    make_run(studio, "cli-made", None, status="interrupted")  # made by the CLI in the workspace: nobody's
    assert sorted(studio.run_names(owner="alice")) == ["alices", "b4m-of-alice", "llm-of-alice"]
    assert [row[0] for row in studio.runs_table("bob")] == ["bobs"]
    assert studio.run_details("alices", "alice")[1] == [str(studio.workspace.runs / "alices" / "samples" / "final.png")]
    out = studio.workspace.new_output(user="bob")
    refused = {
        "details": lambda: studio.run_details("alices", "bob"),
        "resume": lambda: studio.resume("cli-made", "bob"),
        "cancel": lambda: studio.cancel_run("alices", "bob"),
        "export": lambda: studio.export("alices", "diffusers", "bob"),
        "delete": lambda: studio.delete("alices", True, "bob"),
        "generate": lambda: studio.generate_argv([("alices", 1.0)], {"prompt": "a star"}, out, "bob"),
        "analyze": lambda: studio.analyze_argv("alices", {"model": "embedded-sd"}, out, "bob"),
        "chat": lambda: studio.chat_argv("llm-of-alice", {"prompt": "hi"}, out, "bob"),
        "compose": lambda: studio.compose_argv("b4m-of-alice", {}, out, "bob"),
        "compose-pair": lambda: studio.compose_pair_argv(("alices", 1.0), ("alices", 1.0), {"prompt": "a"}, out, "bob"),
    }
    for action, call in refused.items():
        with pytest.raises(UserError, match="no run named"):  # another user's run reads exactly like a missing one
            call()
        assert (studio.workspace.runs / "alices").is_dir(), action
    with pytest.raises(UserError, match="log in first"):
        studio.run_names()
    assert studio.delete("alices", True, "alice") == "deleted alices"
    assert studio.workspace.owner("alices") is None
    shared = Studio(studio.workspace.root)  # without a login every run is everyone's, as before
    try:
        assert sorted(shared.run_names()) == ["b4m-of-alice", "bobs", "cli-made", "llm-of-alice"]
    finally:
        shared.jobs.shutdown()


def test_a_run_started_with_a_login_is_recorded_as_its_users(studio, monkeypatch):
    queued = []
    monkeypatch.setattr(studio.jobs, "submit", lambda argv, **kw: queued.append(kw) or type("J", (), {"id": "j"})())
    studio.start_training("style", DEMO, "style-neon", None, "mine", {"steps": 2}, owner="alice")
    assert studio.workspace.owner("mine") == "alice" and queued[0]["owner"] == "alice"
    with pytest.raises(UserError, match="log in first"):
        studio.start_training("style", DEMO, "style-neon", None, "anon", {"steps": 2})


def test_files_are_served_to_their_owner_only(studio, tmp_path):
    ws = studio.workspace
    make_run(studio, "alices", "alice")
    sample = ws.runs / "alices" / "samples" / "final.png"
    alice_out, bob_out = ws.new_output(user="alice"), ws.new_output(user="bob")
    for path in (alice_out, bob_out):
        path.write_bytes(b"png")
    upload = cached(studio, "x.png", b"png")
    (tmp_path / "secret.txt").write_text("secret")
    assert ws.may_serve(sample, "alice", True) is None and ws.may_serve(alice_out, "alice", True) is None
    assert ws.may_serve(upload, "bob", True) is None  # gradio's own copies: known only to whom they were sent
    for path in (sample, alice_out):
        assert ws.may_serve(path, "bob", True) is not None and ws.may_serve(path, None, True) is not None
    for path in (ws.owners_file, ws.jobs / "x.log", ws.uploads / "a" / "b.png", tmp_path / "secret.txt"):
        assert ws.may_serve(path, "alice", True) is not None, path
    assert ws.may_serve(ws.runs / "alices" / ".." / ".." / ".." / "secret.txt", "alice", True) is not None
    (ws.runs / "alices" / "samples" / "link.png").symlink_to(tmp_path / "secret.txt")
    assert ws.may_serve(ws.runs / "alices" / "samples" / "link.png", "alice", True) is not None
    assert alice_out.parent.name == user_folder("alice") != user_folder("alice ")
    assert ws.may_serve(sample, None, False) is None and ws.may_serve(bob_out, None, False) is None  # shared


def asgi(guard: Guard, path: str, method: str = "GET", cookie: str = "") -> tuple[int, dict, bytes]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    app = type("App", (), {"cookie_id": "c1", "tokens": {"tok-a": "alice", "tok-b": "bob"}})()
    headers = [(b"cookie", cookie.encode())] if cookie else []
    scope = {"type": "http", "path": path, "method": method, "headers": headers, "app": app}
    asyncio.run(guard(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def test_the_guard_refuses_other_users_files_and_never_serves_html(studio):
    ws = studio.workspace
    make_run(studio, "alices", "alice")
    page = ws.runs / "alices" / "samples" / "page.html"
    page.write_text("<script>alert(1)</script>")

    async def gradio(scope, receive, send):  # what gradio's file route answers for a file it serves
        kind = b"text/html" if scope["path"].endswith(".html") else b"image/png"
        headers = [(b"content-type", kind), (b"content-disposition", b'inline; filename="f"')]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data"})

    guard = Guard(gradio, ws, per_user=True)
    status, headers, _ = asgi(guard, f"/gradio_api/file={page}", cookie="access-token-c1=tok-a")
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    assert (
        headers["content-disposition"] == 'attachment; filename="f"' and headers["x-content-type-options"] == "nosniff"
    )
    sample = ws.runs / "alices" / "samples" / "final.png"
    status, headers, _ = asgi(guard, f"/gradio_api/file={sample}", cookie="access-token-c1=tok-a")
    assert status == 200 and headers["content-type"] == "image/png" and "sandbox" in headers["content-security-policy"]
    for cookie in ("access-token-c1=tok-b", "access-token-c1=forged", ""):
        assert asgi(guard, f"/gradio_api/file={sample}", cookie=cookie)[0] == 403, cookie
    assert asgi(guard, "/gradio_api/file=/etc/passwd", cookie="access-token-c1=tok-a")[0] == 403

    stored = [cached(studio, "a.png", b"png"), cached(studio, "evil.svg", b"<svg/>")]

    async def upload(scope, receive, send):  # gradio's upload route: it stored the files, answers their paths
        body = ("[" + ", ".join(f'"{p}"' for p in stored) + "]").encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    status, _, body = asgi(Guard(upload, ws, per_user=True), "/gradio_api/upload", method="POST")
    assert status == 415 and b"evil.svg: not accepted" in body
    assert not any(Path(p).exists() for p in stored)  # the whole refused upload is deleted


def test_refused_uploads_are_deleted_and_the_cache_is_capped(studio):
    ws = studio.workspace
    limits = UploadLimits(max_file_bytes=1000)
    big = cached(studio, "big.png", b"\0" * 2000)
    with pytest.raises(UserError, match="over the"):
        ws.ingest_upload([big], limits)
    assert not Path(big).exists()
    bad_jsonl = cached(studio, "data.txt", b"{}")
    with pytest.raises(UserError, match="not accepted"):
        ws.ingest_data_file(bad_jsonl, limits)
    assert not Path(bad_jsonl).exists()
    with pytest.raises(UserError, match="upload it again"):
        ws.ingest_upload([big], limits)
    fake = [cached(studio, "fake.png", b"not a picture"), cached(studio, "fake.txt", b"caption")]
    with pytest.raises(UserError, match="fake.png"):  # fails the CLI's dataset validation: deleted too
        studio.start_training("style", "upload", "", fake, "", {"steps": 2}, owner="alice")
    assert not any(Path(p).exists() for p in fake) and list(ws.uploads.iterdir()) == []

    files = [cached(studio, f"f{i}.png", b"\0" * 1000) for i in range(5)]
    for age, path in enumerate(files):  # f0 oldest
        stamp = time.time() - 3600 + age
        os.utime(path, (stamp, stamp))
    removed = ws.trim_cache(max_bytes=2500)
    assert sorted(p.name for p in removed) == sorted(Path(p).parent.name for p in files[:3])
    assert [Path(p).exists() for p in files] == [False, False, False, True, True]
    fresh = cached(studio, "fresh.png", b"\0" * 5000)  # younger than the minimum age: kept over the cap
    assert ws.trim_cache(max_bytes=0, min_age_s=60) and Path(fresh).exists()


def test_a_page_follows_and_cancels_its_users_jobs_from_their_records(studio):
    make_run(studio, "alices", "alice", status="interrupted")
    studio.jobs.limits["train"] = 0  # the job stays queued
    job_id = studio.resume("alices", "alice")
    assert studio.follow(None, TRAIN_KINDS, "alice") == job_id  # a reloaded page finds it
    assert studio.follow(None, TRAIN_KINDS, "bob") is None and studio.follow(None, ("train-llm",), "alice") is None
    with pytest.raises(UserError, match="no job"):
        studio.poll(job_id, "bob")
    with pytest.raises(UserError, match="no job"):
        studio.cancel(job_id, "bob")
    assert studio.cancel(None, "bob", TRAIN_KINDS) == "no job to cancel"
    with pytest.raises(UserError, match="already queued or running"):
        studio.resume("alices", "alice")  # one writer per run
    assert studio.cancel_run("alices", "alice") == "alices: cancelled before it started"
    with pytest.raises(UserError, match="no job queued or running"):
        studio.cancel_run("alices", "alice")
    job_id = studio.resume("alices", "alice")
    assert studio.cancel(None, "alice", TRAIN_KINDS) == "cancelled before it started"  # no job id: the record's
    assert (studio.workspace.jobs / f"{job_id}.json").is_file()


@pytest.fixture
def shared(tmp_path):
    app = Studio(tmp_path / "shared")
    yield app
    app.jobs.shutdown()


def name_in(command: str) -> str:
    return command.split("--name ", 1)[1].split()[0]


def test_the_previewed_command_is_the_one_queued_with_a_blank_run_name(shared, monkeypatch):
    queued: list[list[str]] = []
    monkeypatch.setattr(shared.jobs, "submit", lambda argv, **kw: queued.append(argv) or type("J", (), {"id": "j"})())
    values = {"steps": 2}
    Run.create(shared.workspace.runs, "style-neon", kind="train-style", config={})  # taken: the next is -2
    for kind, demo, expected in (
        ("style", "style-neon", "style-neon-2"),
        ("content", "style-neon", "content-style-neon"),
    ):
        command, _ = shared.preview_training(kind, DEMO, demo, "", values)
        _, status, shown, _ = shared.start_training(kind, DEMO, demo, None, "  ", values)
        assert name_in(command) == name_in(shown) == expected and command == shown, (command, shown)
    images = []
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        path = Path(cached(shared, f"{name}.png", b""))
        Image.new("RGB", (64, 64), colour).save(path, format="PNG")
        images += [str(path), cached(shared, f"{name}.txt", b"a caption")]
    command, _ = shared.preview_training("style", "upload", "style-neon", "", values)
    _, _, shown, _ = shared.start_training("style", "upload", "style-neon", images, "", values)
    assert name_in(command) == name_in(shown) == "style-upload"
    command, _ = shared.preview_b4m("content-moon", "style-neon", None, None, "", {})
    _, _, shown, _ = shared.start_b4m("content-moon", "style-neon", None, None, "", {})
    assert command == shown and name_in(shown) == "b4m-content-moon-style-neon"
    command, _ = shared.preview_llm(LLM_EMBEDDED, "", {"method": "lora"})
    _, _, shown, _ = shared.start_llm(LLM_EMBEDDED, None, None, "", {"method": "lora"})
    assert command == shown and name_in(shown) == "llm-lora-task_add_train"


def test_the_b4m_loss_plot_names_every_stage_from_the_start():
    """gradio's plot fixes its colour domain when it first draws; the frame holds every stage from then on."""
    events = [{"kind": "step", "step": s, "loss": 1.0 / s, "stage": "break-content"} for s in (1, 2)]
    plot = gr.LinePlot(x="step", y="loss", color="stage")
    for points in (loss_points([]), loss_points(events)):
        data = plot.postprocess(plot_frame(points, B4M_STAGES))
        assert {row[2] for row in data.data} == set(B4M_STAGES)
        assert data.datatypes == {"step": "quantitative", "loss": "quantitative", "stage": "nominal"}
    data = plot.postprocess(plot_frame(loss_points(events)))  # a one-stage training: exactly its points
    assert [row[:2] for row in data.data] == [[1, 1.0], [2, 0.5]]
