"""The app's workspace: the one folder the UI writes to and serves files from.

    <workspace>/runs/       run folders (the CLI's --runs-dir)
    <workspace>/uploads/    uploaded training sets, one folder per upload
    <workspace>/jobs/       one log per job
    <workspace>/outputs/    generated images and exports
    <workspace>/.gradio/    gradio's upload cache (GRADIO_TEMP_DIR)

The browser never names a server path: it names runs (by their sanitized name, looked up under
runs/), shipped demo sets (by name), and files it uploaded (which gradio keeps in its cache and
this module copies, checked, into uploads/). Every path the UI opens or serves goes through
`Workspace.inside`, which refuses anything that resolves outside the workspace.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import UserError
from studio.runs import list_runs, safe_run_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt",)
METADATA_NAME = "metadata.jsonl"
UPLOAD_SUFFIXES = IMAGE_SUFFIXES + CAPTION_SUFFIXES + (".jsonl",)


@dataclass
class UploadLimits:
    max_file_bytes: int = 20 * 1024 * 1024
    max_files: int = 500
    max_total_bytes: int = 500 * 1024 * 1024
    suffixes: tuple[str, ...] = field(default=UPLOAD_SUFFIXES)


class Workspace:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        for folder in (self.runs, self.uploads, self.jobs, self.outputs, self.cache):
            folder.mkdir(parents=True, exist_ok=True)

    runs = property(lambda self: self.root / "runs")
    uploads = property(lambda self: self.root / "uploads")
    jobs = property(lambda self: self.root / "jobs")
    outputs = property(lambda self: self.root / "outputs")
    cache = property(lambda self: self.root / ".gradio")

    # -- paths ----------------------------------------------------------------------------------
    def inside(self, path: str | os.PathLike, under: Path | None = None) -> Path:
        """`path` resolved (symlinks too), if it lies inside the workspace (or `under`); else a UserError."""
        base = (under or self.root).resolve()
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(base):
            raise UserError(f"refused: {path} is outside the workspace")
        return resolved

    def run_dir(self, name: str) -> Path:
        """The run folder of a run *name* from the browser (sanitized, must exist, must be a run)."""
        if not name or safe_run_name(name) != name:
            raise UserError(f"{name!r} is not a run name")
        directory = self.inside(self.runs / name, under=self.runs)
        if not (directory / "run.json").is_file():
            raise UserError(f"no run named {name!r} in this workspace")
        return directory

    def list_runs(self) -> list[dict]:
        return list_runs(self.runs)

    def unique_run_name(self, wanted: str, taken: set[str] = frozenset()) -> str:
        base = safe_run_name(wanted)
        name, counter = base, 1
        while (self.runs / name).exists() or name in taken:
            counter += 1
            name = f"{base}-{counter}"
        return name

    def delete_run(self, name: str) -> None:
        directory = self.run_dir(name)
        shutil.rmtree(directory)

    def new_output(self, suffix: str = ".png", stem: str = "out") -> Path:
        return self.outputs / f"{safe_run_name(stem)}-{uuid.uuid4().hex[:8]}{suffix}"

    # -- uploads --------------------------------------------------------------------------------
    def ingest_upload(self, files: list[str | os.PathLike], limits: UploadLimits, label: str = "upload") -> Path:
        """Copy uploaded files (paths in gradio's upload cache) into a new uploads/ folder, checked.

        Refused: no files, too many, a file over the size limit or the total over its limit, a
        suffix outside `limits.suffixes`, a path outside the upload cache. File names are reduced
        to safe basenames (no folders, no '..'). Content is checked by the caller with the CLI's
        dataset validation before any job starts."""
        if not files:
            raise UserError(
                "no files uploaded; add images (with .txt captions or a metadata.jsonl), or pick a demo set"
            )
        if len(files) > limits.max_files:
            raise UserError(f"{len(files)} files uploaded; at most {limits.max_files} per set")
        checked, total = [], 0
        for item in files:
            source = self.inside(item, under=self.cache)  # only what gradio received from this browser
            original = Path(str(item)).name
            suffix = source.suffix.lower()
            if suffix not in limits.suffixes or (suffix == ".jsonl" and original.lower() != METADATA_NAME):
                raise UserError(
                    f"{original}: not accepted; upload images ({', '.join(IMAGE_SUFFIXES)}), "
                    f".txt captions or one {METADATA_NAME}"
                )
            size = source.stat().st_size
            if size > limits.max_file_bytes:
                raise UserError(
                    f"{original}: {size / 2**20:.1f} MB is over the {limits.max_file_bytes / 2**20:.0f} MB limit"
                )
            total += size
            if total > limits.max_total_bytes:
                raise UserError(f"the upload is over its {limits.max_total_bytes / 2**20:.0f} MB total limit")
            name = METADATA_NAME if suffix == ".jsonl" else safe_run_name(Path(original).stem) + suffix
            checked.append((source, name))
        names = [name for _, name in checked]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise UserError(f"two uploaded files have the same name after cleaning: {', '.join(clashes)}")
        folder = self.uploads / f"{safe_run_name(label)}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        for source, name in checked:
            shutil.copyfile(source, folder / name)
        return folder

    def ingest_jsonl(self, item: str | os.PathLike, limits: UploadLimits, label: str = "data") -> Path:
        """Copy one uploaded JSONL file (LLM data) into a new uploads/ folder: it must come from the
        upload cache, end in .jsonl and be within the per-file size limit. Its rows are checked by
        the caller with the trainer's own JSONL validation before any job starts."""
        if not item:
            raise UserError("no file uploaded; add a .jsonl file, or use the embedded task")
        source = self.inside(item, under=self.cache)
        original = Path(str(item)).name
        if source.suffix.lower() != ".jsonl":
            raise UserError(f"{original}: not accepted; upload a .jsonl file (one JSON object a line)")
        size = source.stat().st_size
        if size > limits.max_file_bytes:
            raise UserError(
                f"{original}: {size / 2**20:.1f} MB is over the {limits.max_file_bytes / 2**20:.0f} MB limit"
            )
        folder = self.uploads / f"{safe_run_name(label)}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        target = folder / (safe_run_name(Path(original).stem) + ".jsonl")
        shutil.copyfile(source, target)
        return target
