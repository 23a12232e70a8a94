"""The Gradio studio: the tabs assembled into one app, and the server that runs it.

    from ui.app import launch
    launch(Path("studio-workspace"))          # what `studio ui` does (ui/command.py)

ui/studio.py holds the server-side state and every handler (`Studio`), ui/forms.py generates each
command's controls from its option fields, and ui/tabs/ lays out one tab per module. Every job is a
`studio` command run in a worker process (ui/jobs.py); the command and its YAML are shown beside
each form. ui/guard.py stands in front of gradio's file and upload routes (who may fetch what, which
uploads are kept, nothing served as HTML).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from ui.studio import Studio
from ui.tabs import analyze, b4m, generate, llm, runs, training

CACHE_TRIM_S = 60.0  # how often the upload cache is brought back under its cap (also after every upload)

TABS = (training, b4m, generate, llm, analyze, runs)


def build_app(studio: Studio):
    """The Blocks app; `app.forms` maps each command the tabs show to its generated Form."""
    import gradio as gr

    with gr.Blocks(title="peft-studio") as app:
        gr.Markdown(
            f"# peft-studio\nWorkspace: `{studio.workspace.root}` · every job is a `studio` command; "
            "the command and its YAML are shown beside each form."
        )
        forms = {}
        with gr.Tabs():
            for tab in TABS:
                forms.update(tab.build(studio, app))
    app.forms = forms
    return app


def launch(
    workspace: Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: list[tuple[str, str]] | None = None,
    max_jobs: int = 1,
    max_queued: int = 8,
    max_upload_mb: float = 20.0,
    block: bool = True,
    max_cache_mb: float = 2048.0,
):
    """Start the server (what `studio ui` runs). Files are served from the workspace only: with a
    login, each user's own runs and outputs (ui/guard.py)."""
    from starlette.middleware import Middleware

    from ui.guard import Guard

    workspace = Path(workspace).expanduser().resolve()
    (workspace / ".gradio").mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(workspace / ".gradio")  # uploads land inside the workspace
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    studio = Studio(
        workspace,
        max_jobs=max_jobs,
        max_queued=max_queued,
        max_upload_mb=max_upload_mb,
        per_user=auth is not None,
        max_cache_mb=max_cache_mb,
    )
    ws = studio.workspace
    trimmer = threading.Thread(target=_trim_cache, args=(studio,), name="studio-cache", daemon=True)
    trimmer.start()
    app = build_app(studio)
    app.queue(default_concurrency_limit=2, max_size=64)
    print(f"studio ui: workspace {workspace}", flush=True)
    if block and threading.current_thread() is threading.main_thread():

        def interrupt(signum, frame):  # a SIGTERM'd server still stops its jobs cleanly (checkpoints)
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
    try:
        app.launch(
            server_name=host,
            server_port=port,
            auth=auth,
            # Served by path: runs and outputs only (ui/guard.py narrows it to the user's own). The upload
            # cache is deliberately not an allowed path: gradio then serves its files inline only when
            # they are images, audio, video, text or JSON, and the guard adds attachment + nosniff.
            allowed_paths=[str(studio.workspace.runs), str(studio.workspace.outputs)],
            blocked_paths=[str(p) for p in (ws.uploads, ws.jobs, ws.owners_file)],
            app_kwargs={"middleware": [Middleware(Guard, workspace=studio.workspace, per_user=studio.per_user)]},
            run_history=False,
            max_file_size=int(max_upload_mb * 2**20),
            prevent_thread_lock=not block,
            quiet=False,
            footer_links=[],
            ssr_mode=False,
        )
    finally:
        if block:
            studio.jobs.shutdown()
    return app, studio


def _trim_cache(studio: Studio) -> None:
    while True:
        try:
            studio.workspace.trim_cache()
        except OSError as error:
            print(f"studio ui: trimming the upload cache: {error}", flush=True)
        time.sleep(CACHE_TRIM_S)
