"""End to end in a real browser: `studio ui` in a subprocess, Debian's headless Chromium driven by
Playwright (its executable path; never a downloaded browser). Log in, train the demo style for a few
steps, watch progress and the sample appear, find the finished run in the Runs tab; then visit every
tab: generate with the new adapter, train the LLM for a few steps and chat with it, analyze the LM;
and check that the server refuses path traversal and oversized uploads. Then the multi-user safety:
Cancel after a page reload and from the Runs tab (a resumed job too), uploads that could run as HTML
refused and nothing served inline as HTML/SVG, a second user who cannot list, read, use or delete
the first one's runs, and a SIGKILLed server that leaves no worker behind and no second writer after
its restart.

Every wait polls for its condition with a generous deadline (`STUDIO_UI_DEADLINE_S`, default 600 s),
so a loaded machine passes, only later.

Set STUDIO_UI_SCREENSHOTS=<folder> to keep one screenshot per tab (CI keeps them as artifacts;
`STUDIO_UI_SCREENSHOTS=docs/ui` refreshes the ones the docs show).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from ui_server import DEADLINE_S, OTHER_PASSWORD, OTHER_USER, PASSWORD, USER, studio_ui, wait_for

CHROMIUM = os.environ.get("STUDIO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytest.importorskip("gradio", reason="the UI needs gradio: pip install 'peft-studio[ui]'")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright: pip install playwright"
)
if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium), as .ci/setup does",
        allow_module_level=True,
    )
gradio_client = pytest.importorskip("gradio_client", reason="the multi-user checks need gradio_client")
DEADLINE_MS = DEADLINE_S * 1000
sync_api.expect.set_options(timeout=60_000)  # every expect polls; a slow machine only makes it wait longer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with studio_ui(tmp_path_factory.mktemp("ui"), "--max-upload-mb", "1") as running:
        yield {"url": running.url, "root": running.root}


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1800})
        page = context.new_page()
        page.set_default_timeout(120_000)
        yield page
        browser.close()


def screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("STUDIO_UI_SCREENSHOTS"):
        from PIL import Image

        keep = Path(os.environ["STUDIO_UI_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        # A 256-colour palette keeps a page of flat UI readable at about a third of the bytes, so the
        # copies committed under docs/ stay small.
        with Image.open(path) as image:
            palette = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            palette.save(keep / path.name, optimize=True)


def visible(page, label: str):
    """The one visible field with this label (other tabs have fields of the same name)."""
    return page.get_by_label(label, exact=True).filter(visible=True)


def fill(page, label: str, value) -> None:
    box = visible(page, label)
    box.fill(str(value))
    box.press("Tab")


def fill_id(page, elem_id: str, value) -> None:
    """Fill the text field of the control with this elem_id (a text box's label holds its help too)."""
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def choose(page, label: str, option: str) -> None:
    """Pick an option of a gradio Dropdown."""
    visible(page, label).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_login_train_watch_and_list_the_run(server, page, tmp_path):
    expect = sync_api.expect
    page.goto(server["url"])

    def log_in(password: str) -> None:
        page.get_by_label("username").fill(USER)
        page.get_by_label("password").fill(password)
        page.get_by_role("button", name="Login").click()

    log_in("wrong")
    expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
    page.goto(server["url"])
    log_in(PASSWORD)
    page.wait_for_selector("#train-start", timeout=DEADLINE_MS)

    fill(page, "Steps", 3)
    fill(page, "Batch size", 1)
    fill(page, "Sample steps", 1)
    fill(page, "Run name (optional)", "browser-neon")
    fill_id(page, "train-sample-prompts", "a star in neon style")
    page.get_by_text("Method", exact=True).filter(visible=True).click()
    fill_id(page, "train-rank", 2)
    expect(page.locator("#train-command")).to_contain_text("--steps 3")
    expect(page.locator("#train-command")).to_contain_text("studio train-style")

    page.click("#train-start")
    expect(page.locator("#train-status")).to_contain_text("step", timeout=DEADLINE_MS)  # live progress
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=DEADLINE_MS)
    expect(page.locator("#train-sample img")).to_be_visible(timeout=DEADLINE_MS)  # the final sample grid
    screenshot(page, tmp_path, "train")
    run_dir = server["root"] / "ws" / "runs" / "browser-neon"
    assert (run_dir / "adapter" / "style" / "adapter_model.safetensors").is_file()
    assert (run_dir / "samples" / "final.png").is_file()

    page.get_by_role("tab", name="Runs").click()
    page.click("#runs-refresh")
    expect(page.locator("#runs-table")).to_contain_text("browser-neon")
    expect(page.locator("#runs-table")).to_contain_text("finished")


def test_every_tab_works_in_the_browser(server, page, tmp_path):
    """After the training above: generate with its adapter, train the LLM and chat with it, analyze,
    show the Break-for-Make form, and find both runs in the Runs tab; one screenshot per tab."""
    expect = sync_api.expect

    page.get_by_role("tab", name="Generate & compose").click()
    page.get_by_role("button", name="Refresh adapter list").click()
    choose(page, "Adapter 1", "browser-neon")
    fill(page, "Steps", 4)
    page.locator("#generate-button").click()
    expect(page.locator("#generate-gallery img").first).to_be_visible(timeout=DEADLINE_MS)
    expect(page.locator("#generate-command")).to_contain_text("studio generate")
    screenshot(page, tmp_path, "generate")

    page.get_by_role("tab", name="LLM").click()
    fill(page, "Steps", 3)
    fill(page, "Batch size", 4)
    fill(page, "Max length (tokens)", 64)
    fill(page, "Run name (optional)", "browser-llm")
    expect(page.locator("#llm-command")).to_contain_text("studio train-llm")
    expect(page.locator("#llm-command")).to_contain_text("--steps 3")
    page.click("#llm-start")
    expect(page.locator("#llm-status")).to_contain_text("finished", timeout=DEADLINE_MS)
    expect(page.locator("#llm-metrics")).to_contain_text("task_add_test/accuracy")  # before / after
    choose(page, "Run", "browser-llm")  # the finished run joined the chat list by itself
    page.click("#llm-chat-send")
    reply = page.locator("#llm-chat-reply textarea")
    expect(reply).not_to_have_value("", timeout=DEADLINE_MS)
    assert reply.input_value().strip()  # the tiny LM + its new adapter answered something
    assert (
        server["root"] / "ws" / "runs" / "browser-llm" / "adapter" / "default" / "adapter_model.safetensors"
    ).is_file()
    screenshot(page, tmp_path, "llm")

    page.get_by_role("tab", name="Analyze").click()
    choose(page, "Model", "embedded-lm")
    fill(page, "Batches", 1)
    page.locator("#analyze-button").click()
    expect(page.locator("#analyze-heatmap img")).to_be_visible(timeout=DEADLINE_MS)
    screenshot(page, tmp_path, "analyze")

    page.get_by_role("tab", name="Break-for-Make").click()
    expect(visible(page, "Content set")).to_be_visible()
    screenshot(page, tmp_path, "b4m")

    page.get_by_role("tab", name="Runs").click()
    page.click("#runs-refresh")
    expect(page.locator("#runs-table")).to_contain_text("browser-llm")  # an LLM run, listed like any CLI run
    expect(page.locator("#runs-table")).to_contain_text("train-llm")
    choose(page, "Run", "browser-llm")
    expect(page.locator("#runs-summary")).to_contain_text("task_add_test/loss")
    screenshot(page, tmp_path, "runs")


def test_the_server_serves_only_the_workspace_and_refuses_big_uploads(server, page):
    request = page.request  # carries the login cookie of the test above
    secret = server["root"] / "secret.txt"
    secret.write_text("not for browsers")
    workspace = server["root"] / "ws"
    sample = workspace / "runs" / "browser-neon" / "samples" / "final.png"
    allowed = request.get(f"{server['url']}/gradio_api/file={sample}")  # control: logged in, inside the workspace
    assert allowed.status == 200 and allowed.body()[:4] == b"\x89PNG"
    for path in ["/etc/passwd", str(secret), f"{workspace}/../secret.txt", f"{workspace}/runs/../../secret.txt"]:
        response = request.get(f"{server['url']}/gradio_api/file={path}")
        assert response.status >= 400 and "not for browsers" not in response.text(), path
    small = {"files": {"name": "small.png", "mimeType": "image/png", "buffer": b"\0" * 1000}}
    response = request.post(f"{server['url']}/gradio_api/upload", multipart=small)  # control
    assert response.status == 200 and str(workspace / ".gradio") in response.text()  # uploads stay in the workspace
    big = {"files": {"name": "big.png", "mimeType": "image/png", "buffer": b"\0" * (2 * 2**20)}}
    response = request.post(f"{server['url']}/gradio_api/upload", multipart=big)
    assert response.status == 413, response.text()


def run_info(server, name: str) -> dict:
    path = server["root"] / "ws" / "runs" / name / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def checkpoints(server, name: str) -> list[str]:
    folder = server["root"] / "ws" / "runs" / name / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-")) if folder.is_dir() else []


def start_long_training(page, name: str) -> None:
    """A style training far longer than the test: it only ends by Cancel."""
    page.get_by_role("tab", name="Style / Content training").click()
    fill(page, "Steps", 2000)
    fill(page, "Batch size", 1)
    fill(page, "Sample steps", 1)
    fill(page, "Run name (optional)", name)
    sync_api.expect(page.locator("#train-command")).to_contain_text(f"--name {name}")
    page.click("#train-start")


def test_cancel_works_after_a_reload_and_from_the_runs_tab(server, page):
    """The job lives in the workspace's job records, not in the page: a reloaded page follows and
    cancels it, and a job started by Resume is cancelled from the Runs tab (after a reload too)."""
    expect = sync_api.expect
    start_long_training(page, "browser-long")
    wait_for(lambda: run_info(server, "browser-long").get("step", 0) >= 1, "the long training's first step")
    page.reload()  # the page forgets its job id
    page.wait_for_selector("#train-start", timeout=DEADLINE_MS)
    expect(page.locator("#train-status")).to_contain_text("running", timeout=DEADLINE_MS)  # found again
    page.click("#train-cancel")
    expect(page.locator("#train-status")).to_contain_text("interrupted", timeout=DEADLINE_MS)
    info = wait_for(lambda: (i := run_info(server, "browser-long")).get("status") == "interrupted" and i, "the stop")
    stopped_at = info["step"]
    assert checkpoints(server, "browser-long")[-1] == f"step-{stopped_at:08d}"  # a clean stop, resumable

    page.get_by_role("tab", name="Runs").click()
    choose(page, "Run", "browser-long")
    page.click("#runs-resume")
    expect(page.locator("#runs-message")).to_contain_text("resuming")
    wait_for(lambda: run_info(server, "browser-long").get("step", 0) > stopped_at, "the resumed training's next step")
    page.reload()
    page.get_by_role("tab", name="Runs").click()
    choose(page, "Run", "browser-long")
    expect(page.locator("#runs-summary")).to_contain_text("running")
    page.click("#runs-cancel")
    expect(page.locator("#runs-message")).to_contain_text("stopping")
    wait_for(lambda: run_info(server, "browser-long").get("status") == "interrupted", "the resumed job's stop")
    assert run_info(server, "browser-long")["step"] > stopped_at
    stop_file = server["root"] / "ws" / "runs" / "browser-long" / "STOP"
    wait_for(lambda: not stop_file.exists(), "the served stop request to go once the worker has exited")
    expect(page.locator("#runs-message")).to_contain_text("interrupted")  # the Runs tab follows the job to its end


def test_uploads_cannot_store_html_and_nothing_is_served_as_html(server, page):
    """Stored XSS: gradio's upload route takes any file; what the studio does not train on (images,
    .txt, .jsonl) is refused and deleted, and whatever the file route serves is never HTML/SVG/JS."""
    request, url = page.request, server["url"]
    cache = server["root"] / "ws" / ".gradio"
    payloads = {
        "evil.html": ("text/html", b"<script>document.title='pwned'</script>"),
        "evil.svg": ("image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"),
        "evil.js": ("text/javascript", b"alert(1)"),
        "evil.xhtml": ("application/xhtml+xml", b"<html xmlns='http://www.w3.org/1999/xhtml'></html>"),
    }
    for name, (mime, data) in payloads.items():
        response = request.post(
            f"{url}/gradio_api/upload", multipart={"files": {"name": name, "mimeType": mime, "buffer": data}}
        )
        assert response.status == 415 and "not accepted" in response.text(), (name, response.status)
        assert not list(cache.rglob(name)), f"{name} was kept in the upload cache"
    # An allowed suffix with HTML inside is stored, but served as the image type it claims, never sniffed.
    disguised = {"files": {"name": "fake.png", "mimeType": "image/png", "buffer": b"<script>alert(1)</script>"}}
    response = request.post(f"{url}/gradio_api/upload", multipart=disguised)
    assert response.status == 200
    served = request.get(f"{url}/gradio_api/file={json.loads(response.text())[0]}")
    assert served.headers["content-type"] == "image/png" and served.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in served.headers["content-security-policy"]
    # HTML or SVG that reaches a served folder some other way goes out as a download, not a page.
    samples = server["root"] / "ws" / "runs" / "browser-neon" / "samples"
    for name, (_, data) in payloads.items():
        (samples / name).write_bytes(data)
        response = request.get(f"{url}/gradio_api/file={samples / name}")
        assert response.status == 200, name
        assert response.headers["content-type"] == "application/octet-stream", name
        assert response.headers["content-disposition"].startswith("attachment"), name
        (samples / name).unlink()
    viewer = page.context.new_page()  # and Chromium, opening a served "image" with a script in it, runs nothing
    body = b"<html><script>document.title='pwned'</script></html>"
    upload = {"files": {"name": "x.png", "mimeType": "image/png", "buffer": body}}
    stored = json.loads(request.post(f"{url}/gradio_api/upload", multipart=upload).text())[0]
    viewer.goto(f"{url}/gradio_api/file={stored}")
    assert viewer.title() != "pwned"
    viewer.close()


def test_another_user_cannot_list_read_use_or_delete_the_testers_runs(server, page):
    """With a login every run belongs to the user who started it: the intruder's Runs tab, run lists
    and API calls act as if the tester's runs did not exist, and the file route refuses their files."""
    workspace = server["root"] / "ws"
    assert (workspace / "runs" / "browser-neon" / "run.json").is_file()
    context = page.context.browser.new_context(viewport={"width": 1400, "height": 1800})  # its own cookies
    try:
        page = context.new_page()
        page.goto(server["url"])
        page.get_by_label("username").fill(OTHER_USER)
        page.get_by_label("password").fill(OTHER_PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#train-start", timeout=DEADLINE_MS)
        page.get_by_role("tab", name="Runs").click()
        page.click("#runs-refresh")
        sync_api.expect(page.locator("#runs-table")).not_to_contain_text("browser-neon")
        sync_api.expect(page.locator("#runs-table")).not_to_contain_text("browser-llm")
        visible(page, "Run").click()
        assert not page.get_by_role("option", name="browser-neon", exact=True).count()
        stolen = workspace / "runs" / "browser-neon" / "samples" / "final.png"
        assert page.request.get(f"{server['url']}/gradio_api/file={stolen}").status == 403
        for output in (workspace / "outputs").rglob("*.png"):  # the tester's generated images
            assert page.request.get(f"{server['url']}/gradio_api/file={output}").status == 403, output
        assert page.request.get(f"{server['url']}/gradio_api/file={workspace / 'owners.json'}").status == 403
    finally:
        context.close()

    intruder = gradio_client.Client(server["url"], auth=(OTHER_USER, OTHER_PASSWORD), verbose=False)
    table, _ = intruder.predict(api_name="/refresh_runs")
    assert not {row[0] for row in table["data"]} & {"browser-neon", "browser-llm"}
    calls = {
        "/run_details": {"run": "browser-neon"},
        "/resume": {"run": "browser-neon"},
        "/cancel_run": {"run": "browser-neon"},
        "/export": {"run": "browser-neon", "format": "diffusers"},
        "/delete_run": {"run": "browser-neon", "confirmed": True},
        "/chat": {"run": "browser-llm", "prompt": "hello"},
    }
    for endpoint, arguments in calls.items():
        with pytest.raises(Exception, match="no run named"):
            intruder.predict(**arguments, api_name=endpoint)
    assert (workspace / "runs" / "browser-neon" / "adapter").is_dir()  # nothing was deleted
    owner = gradio_client.Client(server["url"], auth=(USER, PASSWORD), verbose=False)  # the tester still sees both
    table, _ = owner.predict(api_name="/refresh_runs")
    assert {"browser-neon", "browser-llm"} <= {row[0] for row in table["data"]}


def worker_pids(workspace: Path) -> dict[str, int]:
    """The worker pid of every job the server started, from the job records (jobs/<id>.json)."""
    records = [json.loads(p.read_text()) for p in (workspace / "jobs").glob("*.json")]
    return {r["id"]: r["pid"] for r in records if r.get("pid")}


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_killed_server_leaves_no_worker_and_its_restart_no_second_writer(tmp_path):
    """SIGKILL the server mid-training: its worker stops (with a checkpoint) instead of training on; the
    restarted server reads the job back as interrupted, resumes it once, refuses a second writer on the
    run, and cancels the resumed job."""
    root = tmp_path / "killed"
    root.mkdir()
    with studio_ui(root) as first:
        user = gradio_client.Client(first.url, auth=(USER, PASSWORD), verbose=False)
        form = {"kind": "style", "source": "demo set", "demo_set": "style-neon", "run_name": "orphan", "steps": 2000}
        user.predict(**form, batch_size=1, sample_steps=1, api_name="/start_training")
        run = first.workspace / "runs" / "orphan"
        wait_for(
            lambda: (run / "run.json").is_file() and json.loads((run / "run.json").read_text()).get("step", 0) >= 1,
            "the first step",
        )
        (pid,) = worker_pids(first.workspace).values()
        assert running(pid)
        first.process.kill()  # SIGKILL: no shutdown handler runs
        first.process.wait()
        wait_for(lambda: not running(pid), f"worker {pid} to exit after its server was killed")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted", info  # it stopped cleanly: a checkpoint at the step it reached
    assert (run / "checkpoints" / f"step-{info['step']:08d}").is_dir()
    steps_then = info["step"]

    with studio_ui(root) as second:
        user = gradio_client.Client(second.url, auth=(USER, PASSWORD), verbose=False)
        table, _ = user.predict(api_name="/refresh_runs")
        assert {row[0]: row for row in table["data"]}["orphan"][2] == "interrupted"
        user.predict(run="orphan", api_name="/resume")
        with pytest.raises(Exception, match="already queued or running"):  # never two writers on one run
            user.predict(run="orphan", api_name="/resume")
        wait_for(lambda: json.loads((run / "run.json").read_text()).get("step", 0) > steps_then, "the resumed step")
        assert re.search("stopping", user.predict(run="orphan", api_name="/cancel_run"))
        wait_for(
            lambda: json.loads((run / "run.json").read_text())["status"] == "interrupted", "the resumed job's stop"
        )
        pids = worker_pids(second.workspace)
        assert len(pids) == 2
        wait_for(lambda: not any(running(p) for p in pids.values()), "every worker to exit")


def test_the_b4m_loss_plot_draws_every_stage(page):
    """Gradio's plot fixes its colour scale when it first draws and afterwards swaps only the data: the
    Break-for-Make tab's frame names every stage from the start, so the later stages get their colour
    (a frame with only the stages logged so far drew the first stage alone, or nothing)."""
    import gradio as gr
    from ui_server import free_port

    from ui.progress import B4M_STAGES
    from ui.tabs.common import plot_frame

    def frame(stages_logged: int):
        rows = [(3 * k + s, 1.0 / (3 * k + s), B4M_STAGES[k]) for k in range(stages_logged) for s in (1, 2, 3)]
        steps, losses, names = zip(*rows) if rows else ((), (), ())
        return plot_frame({"step": list(steps), "loss": list(losses), "stage": list(names)}, B4M_STAGES)

    with gr.Blocks() as demo:  # the B4M tab's plot, as ui/tabs/b4m.py makes and updates it
        plot = gr.LinePlot(frame(0), x="step", y="loss", color="stage", title="Loss", height=240, elem_id="plot")
        for count in (1, 3):
            gr.Button(f"{count}", elem_id=f"stages-{count}").click(lambda c=count: frame(c), None, plot)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_port=port, quiet=True, ssr_mode=False)
    viewer = page.context.new_page()
    try:
        viewer.goto(f"http://127.0.0.1:{port}")
        viewer.click("#stages-1")  # the first stage's steps, then all three (as the poll sees them)
        viewer.click("#stages-3")

        def colours():
            lines = viewer.eval_on_selector_all(
                "#plot g.mark-line path", "paths => paths.map(p => [p.getAttribute('stroke'), p.getAttribute('d')])"
            )
            return len({stroke for stroke, d in lines if stroke and d}) == len(B4M_STAGES)

        wait_for(colours, "a line in its own colour for each of break-content, break-style and make", 120, 0.2)
    finally:
        viewer.close()
        demo.close()
