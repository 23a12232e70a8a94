"""`studio ui`: the Gradio studio in a browser.

    studio ui                                   # http://127.0.0.1:7860, workspace ./studio-workspace
    studio ui --port 8080 --auth-file users.txt --workspace /data/studio

Registered with the studio's command line through the "studio.commands" entry point (pyproject.toml),
so the studio never imports the UI. Served files come only from the workspace; see docs/ui.md for the
security model.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from studio.errors import UserError
from studio.options import Section, option
from studio.preflight import writable_folder

HELP = "The studio in a browser (Gradio): train, watch, generate, compose, manage runs."


@dataclass
class UiOptions:
    host: str = option(
        "127.0.0.1", help="address to listen on (127.0.0.1: this machine only; 0.0.0.0 exposes it, use --auth then)"
    )
    port: int = option(7860, help="port", min=1, max=65535)
    auth: str | None = option(
        None, help="require this login (visible in the process list: prefer --auth-file)", metavar="USER:PASS"
    )
    auth_file: str | None = option(None, help="file of USER:PASS lines ('#' comments)", metavar="FILE")
    workspace: str = option(
        "studio-workspace", help="folder for runs, uploads, jobs and outputs; the only files the UI serves"
    )
    max_jobs: int = option(1, help="training jobs running at once", min=1)
    max_queued: int = option(8, help="jobs waiting in the queue, all users together", min=1)
    max_upload_mb: float = option(20.0, help="largest uploaded file in MB", above=0)
    max_cache_mb: float = option(
        2048.0, help="size cap of the upload cache (<workspace>/.gradio) in MB; the oldest files go first", above=0
    )


def sections() -> list[Section]:
    return [Section(None, UiOptions)]


def parse_auth(auth: str | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """[(user, password)] from --auth and --auth-file, or None for no login."""
    entries = []
    if auth:
        entries.append(("--auth", auth))
    if auth_file:
        path = Path(auth_file)
        if not path.is_file():
            raise UserError(f"auth file {path} does not exist; write one USER:PASS per line")
        lines = path.read_text(encoding="utf-8").splitlines()
        entries += [
            (f"{path}:{n}", line.strip())
            for n, line in enumerate(lines, 1)
            if line.strip() and not line.strip().startswith("#")
        ]
        if not any(where.startswith(str(path)) for where, _ in entries):
            raise UserError(f"auth file {path} holds no USER:PASS line")
    pairs = []
    for where, entry in entries:
        user, separator, password = entry.partition(":")
        if not separator or not user.strip() or not password:
            raise UserError(f"{where}: expected USER:PASS with a non-empty user and password")
        pairs.append((user.strip(), password))
    return pairs or None


def run(args: argparse.Namespace) -> int:
    auth = parse_auth(args.auth, args.auth_file)  # every argument checked before gradio loads
    writable_folder(args.workspace, "--workspace")
    from ui.app import launch

    if auth is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {args.host} without --auth: anyone who reaches this port can train and delete runs"
        )
    launch(
        Path(args.workspace),
        host=args.host,
        port=args.port,
        auth=auth,
        max_jobs=args.max_jobs,
        max_queued=args.max_queued,
        max_upload_mb=args.max_upload_mb,
        max_cache_mb=args.max_cache_mb,
    )
    return 0
