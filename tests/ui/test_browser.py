"""End to end in a real browser: `studio ui` in a subprocess, Debian's headless Chromium driven by
Playwright (its executable path; never a downloaded browser). Log in, train the demo style for a few
steps, watch progress and the sample appear, find the finished run in the Runs tab, and check that
the server refuses path traversal and oversized uploads.

Set STUDIO_UI_SCREENSHOTS=<folder> to keep the screenshots (CI keeps them as artifacts).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("STUDIO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytest.importorskip("gradio", reason="the UI needs gradio: pip install 'peft-studio[ui]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright: pip install playwright")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium), as .ci/setup does",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    (root / "users.txt").write_text("# test login\ntester:correct-horse\n")
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, "-m", "studio.cli", "ui", "--port", str(port), "--workspace",
                                str(root / "ws"), "--auth-file", str(root / "users.txt"), "--max-upload-mb", "1"],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"studio ui did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.3)
    yield {"url": url, "root": root}
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


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
        keep = Path(os.environ["STUDIO_UI_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / path.name)


def test_login_train_watch_and_list_the_run(server, page, tmp_path):
    expect = sync_api.expect
    page.goto(server["url"])

    def log_in(password: str) -> None:
        page.get_by_label("username").fill("tester")
        page.get_by_label("password").fill(password)
        page.get_by_role("button", name="Login").click()

    log_in("wrong")
    expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
    page.goto(server["url"])
    log_in("correct-horse")
    page.wait_for_selector("#train-start", timeout=60_000)

    def fill(label: str, value) -> None:
        box = page.get_by_label(label, exact=True)
        box.fill(str(value))
        box.press("Tab")

    fill("Steps", 3)
    fill("Batch size", 1)
    fill("Sample steps", 1)
    fill("Run name (optional)", "browser-neon")
    page.get_by_label("Sample prompts (one per line)").fill("a star in neon style")
    page.get_by_text("Method", exact=True).click()
    fill("Rank r", 2)
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
