"""What gradio's own routes may serve and store, per user: an ASGI middleware in front of the app.

    app.launch(..., app_kwargs={"middleware": [Middleware(Guard, workspace=ws, per_user=True)]})

Gradio serves files at `/gradio_api/file=<path>` to anyone logged in: files under `allowed_paths`
(inline, whatever their type) and files in its upload cache (inline only for image/audio/video/text/
JSON types). Its upload route, `/gradio_api/upload`, stores any file a logged-in browser posts. So:

- file route: `Workspace.may_serve` decides (the upload cache; with a login only the user's own runs
  and outputs; never uploads/, jobs/ or anything outside the workspace: 403 otherwise), and every file
  response is hardened: a type other than a plain image, text or JSON is sent as an attachment of
  type application/octet-stream, with `X-Content-Type-Options: nosniff` and `Content-Security-Policy:
  sandbox`, so no uploaded or generated file runs as HTML, SVG or script in a user's browser;
- upload route: files whose suffix is not an image, `.txt` or LLM data (`.jsonl`, `.json`, `.csv`,
  `.parquet`) are deleted at once and the upload answers 415; after every upload the cache is trimmed to
  its size cap (oldest first).

The user is gradio's own: the login cookie's token looked up in the app's tokens, as gradio's
`/gradio_api/user` route does.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ui.workspace import Workspace

FILE_ROUTE = re.compile(r"^/(?:gradio_api/)?file[=/](.*)$", re.S)
UPLOAD_ROUTE = re.compile(r"^/(?:gradio_api/)?upload/?$")
INLINE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "text/plain", "application/json"}
HARDENING = [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", b"sandbox; default-src 'none'")]


class Guard:
    def __init__(self, app, workspace: Workspace, per_user: bool) -> None:
        self.app, self.workspace, self.per_user = app, workspace, per_user

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        served = FILE_ROUTE.match(path)
        if served:
            refusal = self.workspace.may_serve(served.group(1), user_of(scope), self.per_user)
            if refusal is not None:
                await respond(send, 403, f"File not allowed: {refusal}")
                return
            await self.app(scope, receive, hardened(send))
            return
        if UPLOAD_ROUTE.match(path) and scope.get("method") == "POST":
            await self.upload(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def upload(self, scope, receive, send) -> None:
        """Gradio's upload, then: refuse (delete, 415) any file of a type the studio does not take."""
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            try:
                paths = json.loads(body)
            except ValueError:
                paths = None
            refusal = self.workspace.screen_upload(paths if isinstance(paths, list) else [])
            if refusal is not None:
                await respond(send, 415, refusal)
                return
        await send(start)
        await send({"type": "http.response.body", "body": body})


def user_of(scope) -> str | None:
    """The logged-in user of a request (gradio's login cookie), or None."""
    app = scope.get("app")
    cookie_id, tokens = getattr(app, "cookie_id", None), getattr(app, "tokens", None) or {}
    if cookie_id is None:
        return None
    cookies = {}
    for name, value in scope.get("headers", []):
        if name.lower() == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key, _, val = part.strip().partition("=")
                cookies.setdefault(key, val)
    for key in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        user = tokens.get(cookies.get(key))
        if user:
            return user
    return None


def hardened(send):
    """`send` with a file response made safe: only plain images, text and JSON inline, never sniffed."""

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in dict(HARDENING)]
            kind = next((v for k, v in headers if k.lower() == b"content-type"), b"").decode("latin-1")
            if kind.split(";")[0].strip().lower() not in INLINE_TYPES:
                disposition = next((v for k, v in headers if k.lower() == b"content-disposition"), b"")
                filename = disposition.partition(b";")[2].strip()
                headers = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-disposition")]
                headers += [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-disposition", b"attachment" + (b"; " + filename if filename else b"")),
                ]
            message = {**message, "headers": headers + HARDENING}
        await send(message)

    return wrapped


async def respond(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *HARDENING]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
