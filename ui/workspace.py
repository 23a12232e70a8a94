"""The app's workspace: the one folder the UI writes to and serves files from.

    <workspace>/runs/             run folders (the CLI's --runs-dir)
    <workspace>/owners.json       who started each run (with a login: each user sees only their own runs)
    <workspace>/uploads/          uploaded training sets, one folder per upload
    <workspace>/jobs/             one log and one record (<id>.json) per job
    <workspace>/outputs/          generated images and exports (with a login: outputs/users/<user>/)
    <workspace>/.gradio/          gradio's upload cache (GRADIO_TEMP_DIR), capped in size

The browser never names a server path: it names runs (by their sanitized name, looked up under
runs/), shipped demo sets (by name), and files it uploaded (which gradio keeps in its cache and
this module copies, checked, into uploads/). Every path the UI opens or serves goes through
`Workspace.inside`, which refuses anything that resolves outside the workspace; `Workspace.may_serve`
decides what gradio's file route may hand to which user (ui/guard.py).

Users: `user=None` means "no login" (every run is everyone's, as the CLI sees the folder). With a
login, a run belongs to the user who started it (owners.json, written when its job is queued) and
`run_dir`, `list_runs` and `may_serve` act as if other users' runs did not exist. Runs made outside the
UI (the CLI) have no owner and are shown only without a login.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import UserError
from studio.runs import list_runs, safe_run_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt",)
METADATA_NAME = "metadata.jsonl"
UPLOAD_SUFFIXES = IMAGE_SUFFIXES + CAPTION_SUFFIXES + (".jsonl",)  # an image set: anything else is refused
LLM_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # what the LLM trainer reads
# What gradio's upload route may store at all (screen_upload): anything else is deleted at once.
STORABLE_SUFFIXES = tuple(dict.fromkeys(UPLOAD_SUFFIXES + LLM_DATA_SUFFIXES))
CACHE_MIN_AGE_S = 120.0  # the cache cap never evicts a file younger than this (an upload about to be used)


@dataclass
class UploadLimits:
    max_file_bytes: int = 20 * 1024 * 1024
    max_files: int = 500
    max_total_bytes: int = 500 * 1024 * 1024
    suffixes: tuple[str, ...] = field(default=UPLOAD_SUFFIXES)


def user_folder(user: str) -> str:
    """A folder name for a login: readable, safe, and distinct for distinct names ("a b" vs "a-b")."""
    try:
        readable = safe_run_name(user)[:40]
    except UserError:
        readable = "user"
    return f"{readable}-{hashlib.sha256(user.encode('utf-8')).hexdigest()[:8]}"


class Workspace:
    def __init__(self, root: str | os.PathLike, max_cache_bytes: int = 2 * 2**30) -> None:
        self.root = Path(root).expanduser().resolve()
        self.max_cache_bytes = max_cache_bytes
        for folder in (self.runs, self.uploads, self.jobs, self.outputs, self.cache):
            folder.mkdir(parents=True, exist_ok=True)
        self._owners_lock = threading.Lock()

    runs = property(lambda self: self.root / "runs")
    uploads = property(lambda self: self.root / "uploads")
    jobs = property(lambda self: self.root / "jobs")
    outputs = property(lambda self: self.root / "outputs")
    cache = property(lambda self: self.root / ".gradio")
    owners_file = property(lambda self: self.root / "owners.json")

    # -- paths ----------------------------------------------------------------------------------
    def inside(self, path: str | os.PathLike, under: Path | None = None) -> Path:
        """`path` resolved (symlinks too), if it lies inside the workspace (or `under`); else a UserError."""
        base = (under or self.root).resolve()
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(base):
            raise UserError(f"refused: {path} is outside the workspace")
        return resolved

    def run_dir(self, name: str, user: str | None = None) -> Path:
        """The run folder of a run *name* from the browser (sanitized, must exist, must be a run, and
        with a login must be `user`'s: another user's run reads exactly like a missing one)."""
        if not name or safe_run_name(name) != name:
            raise UserError(f"{name!r} is not a run name")
        directory = self.inside(self.runs / name, under=self.runs)
        if not (directory / "run.json").is_file() or not self.visible(name, user):
            raise UserError(f"no run named {name!r} in this workspace")
        return directory

    def list_runs(self, user: str | None = None) -> list[dict]:
        owners = self._read_owners() if user is not None else {}
        return [run for run in list_runs(self.runs) if user is None or owners.get(run["name"]) == user]

    def unique_run_name(self, wanted: str, taken: set[str] = frozenset()) -> str:
        base = safe_run_name(wanted)
        name, counter = base, 1
        while (self.runs / name).exists() or name in taken:
            counter += 1
            name = f"{base}-{counter}"
        return name

    def delete_run(self, name: str, user: str | None = None) -> None:
        directory = self.run_dir(name, user)
        shutil.rmtree(directory)
        with self._owners_lock:
            owners = self._read_owners()
            if owners.pop(name, None) is not None:
                self._write_owners(owners)

    # -- owners ---------------------------------------------------------------------------------
    def owner(self, name: str) -> str | None:
        return self._read_owners().get(name)

    def set_owner(self, name: str, user: str) -> None:
        """Record who started run `name` (before its folder exists: the job is only queued)."""
        with self._owners_lock:
            owners = self._read_owners()
            owners[name] = user
            self._write_owners(owners)

    def visible(self, name: str, user: str | None) -> bool:
        return user is None or self.owner(name) == user

    def _read_owners(self) -> dict[str, str]:
        try:
            owners = json.loads(self.owners_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return owners if isinstance(owners, dict) else {}

    def _write_owners(self, owners: dict[str, str]) -> None:
        partial = self.owners_file.with_name(f".owners-{uuid.uuid4().hex[:8]}.partial")
        partial.write_text(json.dumps(owners, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(partial, self.owners_file)

    # -- outputs --------------------------------------------------------------------------------
    def outputs_of(self, user: str | None = None) -> Path:
        """Where a user's generated images and exports go (everyone's outputs/ without a login)."""
        folder = self.outputs if user is None else self.outputs / "users" / user_folder(user)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def new_output(self, suffix: str = ".png", stem: str = "out", user: str | None = None) -> Path:
        return self.outputs_of(user) / f"{safe_run_name(stem)}-{uuid.uuid4().hex[:8]}{suffix}"

    # -- serving --------------------------------------------------------------------------------
    def may_serve(self, path: str | os.PathLike, user: str | None, per_user: bool) -> str | None:
        """None if gradio's file route may hand `path` to `user`, else why not. Served: files in the
        upload cache (gradio's own copies, named by a keyed hash of their content, so a URL is known
        only to the session it was sent to); with a login, the user's own runs and outputs; without
        one, every run and output. Never: uploads/, jobs/, owners.json, anything outside."""
        try:
            resolved = Path(os.path.abspath(path)).resolve()
        except (OSError, ValueError):
            return "not a path"
        if not resolved.is_relative_to(self.root):
            return "outside the workspace"
        if resolved.is_relative_to(self.cache.resolve()):
            return None
        if per_user and user is None:
            return "not logged in"
        if resolved.is_relative_to(self.runs):
            parts = resolved.relative_to(self.runs).parts
            if len(parts) < 2 or not self.visible(parts[0], user if per_user else None):
                return "not your run"
            return None
        if resolved.is_relative_to(self.outputs):
            mine = self.outputs_of(user if per_user else None).resolve()
            return None if resolved.is_relative_to(mine) else "not your output"
        return "not a served folder"

    # -- uploads --------------------------------------------------------------------------------
    def ingest_upload(self, files: list[str | os.PathLike], limits: UploadLimits, label: str = "upload") -> Path:
        """Copy uploaded files (paths in gradio's upload cache) into a new uploads/ folder, checked.

        Refused: no files, too many, a file over the size limit or the total over its limit, a
        suffix outside `limits.suffixes`, a path outside the upload cache. File names are reduced
        to safe basenames (no folders, no '..'). A refused set is deleted from the cache. Content is
        checked by the caller with the CLI's dataset validation before any job starts (and the
        caller deletes the set with `discard_upload` if that fails)."""
        if not files:
            raise UserError(
                "no files uploaded; add images (with .txt captions or a metadata.jsonl), or pick a demo set"
            )
        try:
            checked = self._check_upload(files, limits)
        except UserError:
            self.discard_upload(files)
            raise
        folder = self.uploads / f"{safe_run_name(label)}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        for source, name in checked:
            shutil.copyfile(source, folder / name)
        return folder

    def _check_upload(self, files: list[str | os.PathLike], limits: UploadLimits) -> list[tuple[Path, str]]:
        if len(files) > limits.max_files:
            raise UserError(f"{len(files)} files uploaded; at most {limits.max_files} per set")
        checked, total = [], 0
        for item in files:
            source = self._cached(item)
            original = Path(str(item)).name
            suffix = source.suffix.lower()
            if suffix not in limits.suffixes or (suffix == ".jsonl" and original.lower() != METADATA_NAME):
                raise UserError(
                    f"{original}: not accepted; upload images ({', '.join(IMAGE_SUFFIXES)}), "
                    f".txt captions or one {METADATA_NAME}"
                )
            size = self._size_within(source, original, limits)
            total += size
            if total > limits.max_total_bytes:
                raise UserError(f"the upload is over its {limits.max_total_bytes / 2**20:.0f} MB total limit")
            name = METADATA_NAME if suffix == ".jsonl" else safe_run_name(Path(original).stem) + suffix
            checked.append((source, name))
        names = [name for _, name in checked]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise UserError(f"two uploaded files have the same name after cleaning: {', '.join(clashes)}")
        return checked

    def _cached(self, item: str | os.PathLike) -> Path:
        """An uploaded file: inside gradio's upload cache (only what gradio received), still there."""
        source = self.inside(item, under=self.cache)
        if not source.is_file():
            raise UserError(f"{Path(str(item)).name}: the upload is gone (refused or evicted); upload it again")
        return source

    @staticmethod
    def _size_within(source: Path, original: str, limits: UploadLimits) -> int:
        size = source.stat().st_size
        if size > limits.max_file_bytes:
            raise UserError(
                f"{original}: {size / 2**20:.1f} MB is over the {limits.max_file_bytes / 2**20:.0f} MB limit"
            )
        return size

    def ingest_data_file(self, item: str | os.PathLike, limits: UploadLimits, label: str = "data") -> Path:
        """Copy one uploaded LLM data file (JSONL, JSON, CSV or Parquet) into a new uploads/ folder: it must
        come from the upload cache, have one of those suffixes and be within the per-file size limit. Its
        rows are checked by the caller with the trainer's own validation before any job starts. Refused:
        deleted."""
        if not item:
            raise UserError(
                f"no file uploaded; add a data file ({', '.join(LLM_DATA_SUFFIXES)}), or use the embedded task"
            )
        try:
            source = self._cached(item)
            original = Path(str(item)).name
            suffix = source.suffix.lower()
            if suffix not in LLM_DATA_SUFFIXES:
                raise UserError(
                    f"{original}: not accepted; upload a {', '.join(LLM_DATA_SUFFIXES)} file (rows of one format: "
                    "messages, sharegpt, alpaca, prompt-completion, text or preference pairs)"
                )
            self._size_within(source, original, limits)
        except UserError:
            self.discard_upload([item])
            raise
        folder = self.uploads / f"{safe_run_name(label)}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        target = folder / (safe_run_name(Path(original).stem) + suffix)
        shutil.copyfile(source, target)
        return target

    def discard_upload(self, files: list[str | os.PathLike | None]) -> None:
        """Delete uploaded files from gradio's cache (a refused upload), with their hash folders once
        empty. Paths outside the cache are left alone."""
        cache = self.cache.resolve()
        for item in files:
            if not item:
                continue
            try:
                path = Path(item).resolve()
            except (OSError, ValueError):
                continue
            if not path.is_relative_to(cache) or path == cache:
                continue
            if path.is_file():
                path.unlink(missing_ok=True)
            parent = path.parent
            if parent != cache and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()

    def trim_cache(self, max_bytes: int | None = None, min_age_s: float = CACHE_MIN_AGE_S) -> list[Path]:
        """Keep gradio's upload cache under `max_bytes` by deleting its oldest entries (a hash folder
        or a loose file) first; entries younger than `min_age_s` are kept. Returns what was deleted."""
        limit = self.max_cache_bytes if max_bytes is None else max_bytes
        entries = []
        for entry in self.cache.iterdir():
            try:
                files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
                size = sum(p.stat().st_size for p in files)
                newest = max([p.stat().st_mtime for p in files] or [entry.stat().st_mtime])
            except OSError:  # deleted while we looked
                continue
            entries.append((newest, size, entry))
        total = sum(size for _, size, _ in entries)
        removed, now = [], time.time()
        for newest, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= limit:
                break
            if now - newest < min_age_s:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            total -= size
            removed.append(entry)
        return removed

    def screen_upload(self, paths: list) -> str | None:
        """After gradio's upload route stored `paths`: None if every file has a suffix the studio takes
        (images, .txt captions, LLM data: .jsonl, .json, .csv, .parquet); else all of them are deleted and
        the answer says why. Either way the cache is then trimmed to its cap."""
        names = [Path(str(p)).name for p in paths]
        refused = [name for name in names if Path(name).suffix.lower() not in STORABLE_SUFFIXES]
        message = None
        if refused:
            self.discard_upload([str(p) for p in paths])
            message = (
                f"{', '.join(refused)}: not accepted; upload images ({', '.join(IMAGE_SUFFIXES)}), "
                f".txt captions or LLM data ({', '.join(LLM_DATA_SUFFIXES)})"
            )
        self.trim_cache()
        return message
