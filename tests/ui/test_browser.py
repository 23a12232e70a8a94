"""End to end in a real browser: `studio ui` in a subprocess, Debian's headless Chromium driven by
Playwright (its executable path; never a downloaded browser). Log in, train the demo style for a few
steps, watch progress and the sample appear, find the finished run in the Runs tab; then visit every
tab: generate with the new adapter, train the LLM for a few steps and chat with it, analyze the LM;
and check that the server refuses path traversal and oversized uploads.

Set STUDIO_UI_SCREENSHOTS=<folder> to keep one screenshot per tab (CI keeps them as artifacts;
`STUDIO_UI_SCREENSHOTS=docs/ui` refreshes the ones the docs show).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ui_server import PASSWORD, USER, studio_ui

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
        page.set_default_timeout(30_000)
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
    page.wait_for_selector("#train-start", timeout=60_000)

    fill(page, "Steps", 3)
    fill(page, "Batch size", 1)
    fill(page, "Sample steps", 1)
    fill(page, "Run name (optional)", "browser-neon")
    fill_id(page, "train-sample-prompts", "a star in neon style")
    page.get_by_text("Method", exact=True).filter(visible=True).click()
    fill_id(page, "train-rank", 2)
    expect(page.locator("#train-command")).to_contain_text("--steps 3", timeout=10_000)
    expect(page.locator("#train-command")).to_contain_text("studio train-style")

    page.click("#train-start")
    expect(page.locator("#train-status")).to_contain_text("step", timeout=90_000)  # live progress
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=90_000)
    expect(page.locator("#train-sample img")).to_be_visible(timeout=10_000)  # the final sample grid
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
    expect(page.locator("#generate-gallery img").first).to_be_visible(timeout=120_000)
    expect(page.locator("#generate-command")).to_contain_text("studio generate")
    screenshot(page, tmp_path, "generate")

    page.get_by_role("tab", name="LLM").click()
    fill(page, "Steps", 3)
    fill(page, "Batch size", 4)
    fill(page, "Max length (tokens)", 64)
    fill(page, "Run name (optional)", "browser-llm")
    expect(page.locator("#llm-command")).to_contain_text("studio train-llm", timeout=10_000)
    expect(page.locator("#llm-command")).to_contain_text("--steps 3")
    page.click("#llm-start")
    expect(page.locator("#llm-status")).to_contain_text("finished", timeout=120_000)
    expect(page.locator("#llm-metrics")).to_contain_text("task_add_test/accuracy")  # before / after
    choose(page, "Run", "browser-llm")  # the finished run joined the chat list by itself
    page.click("#llm-chat-send")
    reply = page.locator("#llm-chat-reply textarea")
    expect(reply).not_to_have_value("", timeout=90_000)
    assert reply.input_value().strip()  # the tiny LM + its new adapter answered something
    assert (
        server["root"] / "ws" / "runs" / "browser-llm" / "adapter" / "default" / "adapter_model.safetensors"
    ).is_file()
    screenshot(page, tmp_path, "llm")

    page.get_by_role("tab", name="Analyze").click()
    choose(page, "Model", "embedded-lm")
    fill(page, "Batches", 1)
    page.locator("#analyze-button").click()
    expect(page.locator("#analyze-heatmap img")).to_be_visible(timeout=120_000)
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
