"""The Gradio studio: the tabs assembled into one app, and the server that runs it.

    from ui.app import launch
    launch(Path("studio-workspace"))          # what `studio ui` does (ui/command.py)

ui/studio.py holds the server-side state and every handler (`Studio`), ui/forms.py generates each
command's controls from its option fields, and ui/tabs/ lays out one tab per module. Every job is a
`studio` command run in a worker process (ui/jobs.py); the command and its YAML are shown beside
each form.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from ui.studio import Studio
from ui.tabs import analyze, b4m, generate, llm, runs, training

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
):
    """Start the server (what `studio ui` runs). Files are served from the workspace only."""
    workspace = Path(workspace).expanduser().resolve()
    (workspace / ".gradio").mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(workspace / ".gradio")  # uploads land inside the workspace
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    studio = Studio(workspace, max_jobs=max_jobs, max_queued=max_queued, max_upload_mb=max_upload_mb)
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
            allowed_paths=[str(workspace)],
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
