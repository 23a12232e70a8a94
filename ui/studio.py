"""The UI's server side: its state and every handler as a plain method (unit-testable without a browser).

Every job is a `studio ...` command line run in a worker process (ui/jobs.py). A handler takes what
the page knows (demo set names, uploaded files, a run name) and a dict of the form's option values
({"train.steps": 2, "adapter.rank": 4, ...}, or bare field names where unique); it fills in what the
browser never names (data folders, the runs folder, output paths) and turns the rest into flags with
`studio.options.to_argv`, so the command shown beside a form is the command that runs, and its YAML is
`api.config_yaml` of that command.

    studio = Studio(Path("studio-workspace"), per_user=True)
    argv = studio.training_argv("style", "assets/sets/style-neon", "neon", {"steps": 50, "rank": 4})

Who asks: every handler takes `owner`, the logged-in user's name with a login (`per_user=True`: each
user sees, uses and deletes only the runs they started, and only their own jobs), a browser session
without one (everything is shared; the session only bounds how many jobs one page may queue).
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from studio import api
from studio.errors import UserError
from studio.options import to_argv
from ui.forms import clean_values, command_controls
from ui.jobs import Job, JobManager, writer_of
from ui.progress import describe, eval_table, events_of, loss_points, run_info
from ui.workspace import UploadLimits, Workspace

TRAIN_KINDS = ("train-style", "train-content")
LLM_KIND = "train-llm"
B4M_KIND = "break-for-make"
RESUMABLE_KINDS = (*TRAIN_KINDS, LLM_KIND, B4M_KIND)  # the kinds whose training stops on STOP with a checkpoint
DEMO = "demo set"
LLM_EMBEDDED = "embedded task"
LLM_BASE_ONLY = "(the embedded base, no adapter)"
NO_ADAPTER = "(none)"
UPLOAD_PENDING = "(shown once the upload is checked)"
ANALYZE_MODELS = ("embedded-sd", "embedded-lm")  # the browser analyzes the shipped bases only
# The options the quick-job forms show (the rest are the server's: outputs, devices, adapters by path).
FORM_OPTIONS: dict[str, tuple[str, ...]] = {
    "generate": ("prompt", "seed", "steps", "guidance", "size", "merge"),
    "compose": ("content_weight", "style_weight", "prompt", "seed"),  # Break-for-Make (its two factors' weights)
    # compose a content run and a style run (their weights are the page's, in --content/--style RUN:WEIGHT)
    "compose-pair": ("combine", "prompt", "seed", "zip_steps", "zip_lr", "zip_similarity", "zip_batch", "zip_seed"),
    "chat": ("prompt", "raw", "max_new_tokens", "temperature", "top_p", "seed"),
    "analyze": ("model", "batches", "batch_size", "seq_len", "steps", "guidance", "seed"),
}
RunPick = tuple[str | None, Any]  # (a finished run's name, the weight its slider gives it)
# The command of a form whose FORM_OPTIONS key is not a command's name (a second form of one command).
FORM_COMMANDS: dict[str, str] = {"compose-pair": "compose"}


def form_command(form: str) -> str:
    """The `studio` command whose options form `form` (a FORM_OPTIONS key, or a command's name) shows."""
    return FORM_COMMANDS.get(form, form)


def form_values(form: str, values: dict[str, Any]) -> dict[str, Any]:
    """The values of form `form` (a command's name, or a FORM_OPTIONS key such as "compose-pair"),
    typed and checked against the controls it has."""
    return clean_values(command_controls(form_command(form), only=FORM_OPTIONS.get(form)).values(), values)


def command_argv(command_words: list[str], values: dict[str, Any], form: str | None = None) -> list[str]:
    """`command_words` (what the studio fills in) + a flag per value of form `form` (default: the command's
    own, command_words[0]) that differs from its default."""
    command = command_words[0]
    form = form or command
    if form_command(form) != command:
        raise ValueError(f"form {form!r} is of `studio {form_command(form)}`, not of `studio {command}`")
    return to_argv(command_words, api.command_sections(command), form_values(form, values))


def adapter_weight(weight: Any, which: str) -> float:
    """A weight slider's value as the float of RUN:WEIGHT (empty: 1.0, as the CLI's PATH alone)."""
    if weight is None or (isinstance(weight, str) and not weight.strip()):
        return 1.0
    try:
        number = float(weight)
    except (TypeError, ValueError):
        raise UserError(f"{which} weight: enter a number, not {weight!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{which} weight must be a finite number, not {weight!r}")
    return number


def adapter_values(command: str, values: dict[str, Any], trainer: str) -> dict[str, Any]:
    """The form's values without a rank or alpha the chosen method does not have (Compacter: neither;
    the form greys them out, a dict from elsewhere may still carry them)."""
    values = form_values(command, values)
    method = values.get("adapter.method") or "lora"
    defaults = api.adapter_defaults(method, trainer)
    for name, key in (("adapter.rank", "r"), ("adapter.alpha", "alpha")):
        if key not in defaults:
            values.pop(name, None)
    return values


def training_name(kind: str, source: str, demo: str) -> str:
    """The run name of a training started with a blank name: the demo set's name when it is of this
    kind (style-neon), else kind-set (style-content-moon), kind-upload for uploaded images."""
    if source != DEMO:
        return f"{kind}-upload"
    return demo if demo.startswith(kind) else f"{kind}-{demo}"


def b4m_name(content: str, style: str, content_files: list | None, style_files: list | None) -> str:
    return f"b4m-{'upload' if content_files else content}-{'upload' if style_files else style}"


def llm_name(method: str, upload: bool, objective: str = "sft") -> str:
    """The default LLM run name, as `studio train-llm` makes it (dpo / orpo train the embedded preference pairs)."""
    preference = objective not in ("", "sft")
    data = "upload" if upload else "preference_add_train" if preference else "task_add_train"
    return f"llm-{method}{f'-{objective}' if preference else ''}-{data}"


def sample_note(grid: str | None) -> str:
    """' · samples: seeds 0-3, EulerDiscreteScheduler, 20 steps, guidance 5.0' from the JSON beside a grid
    (how to draw its pictures again elsewhere); '' without one."""
    record_path = Path(grid).with_suffix(".json") if grid else None
    if record_path is None or not record_path.is_file():
        return ""
    try:
        record = json.loads(record_path.read_text())
        seeds = [image["seed"] for image in record["images"]]
        seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
        return (
            f" · samples: {seed_text}, {record['sampler']}, {record['steps']} steps, guidance {record['guidance']}"
            f"{' (moving average)' if record.get('adapter') == 'moving average' else ''}"
        )
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""  # a record being written or from elsewhere: the grid itself still shows


def cancel_message(job: Job) -> str:
    return {"cancelled": "cancelled before it started", "stopping": "stopping: writing a checkpoint"}.get(
        job.status, job.status
    )


def run_writer(directory: Path) -> int | None:
    """The live process (not this server) that holds run `directory`'s lock, studio.run_lock: a CLI
    command or a worker of this or an earlier server. None if nothing writes the run now."""
    return writer_of(directory)


class Studio:
    def __init__(
        self,
        workspace: Path,
        max_jobs: int = 1,
        max_queued: int = 8,
        max_upload_mb: float = 20.0,
        stop_grace_s: float = 120.0,
        per_user: bool = False,
        max_cache_mb: float = 2048.0,
        orphan_grace_s: float = 30.0,
    ) -> None:
        self.workspace = Workspace(workspace, max_cache_bytes=int(max_cache_mb * 2**20))
        self.limits = UploadLimits(max_file_bytes=int(max_upload_mb * 2**20))
        self.per_user = per_user
        self.jobs = JobManager(
            {"train": max_jobs, "light": 1},
            jobs_dir=self.workspace.jobs,
            max_queued=max_queued,
            stop_grace_s=stop_grace_s,
            orphan_grace_s=orphan_grace_s,
        )
        # Held from choosing a free run name to queueing the job, so two users asking for the same
        # name at the same moment get two run folders ("x", "x-2") instead of one refused job.
        self._naming = threading.RLock()

    def user(self, owner: str) -> str | None:
        """Whose runs `owner` may see: with a login the user's own, without one everyone's (None)."""
        if not self.per_user:
            return None
        if not owner:
            raise UserError("log in first")
        return owner

    def _run_words(self, command: str, *words: str, name: str) -> list[str]:
        return [command, *words, "--runs-dir", str(self.workspace.runs), "--name", name]

    def free_run_name(self, wanted: str) -> str:
        """The run name a job asking for `wanted` gets now (`wanted`, else `wanted-2`, ...)."""
        return self.workspace.unique_run_name(wanted, {p.name for p in self.jobs.active_run_dirs()})

    def _submit_training(self, wanted: str, make_argv, owner: str) -> tuple[Job, str, list[str]]:
        """Pick a free run name, build the argv for it (make_argv(run name)), check it, queue it, and
        with a login record the run as `owner`'s."""
        user = self.user(owner)
        with self._naming:
            run_name = self.free_run_name(wanted)
            argv = make_argv(run_name)
            job = self.jobs.submit(
                argv, lane="train", owner=owner, run_dir=self.workspace.runs / run_name, stoppable=True
            )
            if user is not None:
                self.workspace.set_owner(run_name, user)
        return job, run_name, argv

    # -- training (style / content) -------------------------------------------------------------
    def training_argv(self, kind: str, data: str, name: str, values: dict[str, Any]) -> list[str]:
        if kind not in ("style", "content"):
            raise UserError(f"kind must be style or content, not {kind!r}")
        command = f"train-{kind}"
        options = adapter_values(command, values, "diffusion")
        return to_argv(self._run_words(command, data, name=name), api.command_sections(command), options)

    def dataset_folder(
        self, source: str, demo: str, files: list | None, kind: str, template: str = "", trigger: str = ""
    ) -> tuple[Path, str]:
        """(validated training folder, a note on it) from a demo-set name or uploaded files."""
        if source == DEMO:
            sets = api.demo_sets()
            if demo not in sets:
                raise UserError(f"no shipped set named {demo!r}; choose one of {', '.join(sets)}")
            folder = sets[demo]
        else:
            folder = self.workspace.ingest_upload([_file_path(f) for f in files or []], self.limits, label=kind)
        try:
            count, warnings = api.validate_dataset(folder, template, trigger)
        except UserError:
            if source != DEMO:
                shutil.rmtree(folder, ignore_errors=True)
                self.workspace.discard_upload([_file_path(f) for f in files or []])
            raise
        note = f"{count} images" + (f"; warnings: {'; '.join(warnings)}" if warnings else "")
        return folder, note

    def preview_training(self, kind: str, source: str, demo: str, name: str, values: dict) -> tuple[str, str]:
        """(command, YAML) of the form as it stands, or ("# <the error>", ""): the run name is the one
        Start would get now (the default for a blank name, made free with -2, -3 like Start does)."""
        data = str(api.demo_sets().get(demo, "")) if source == DEMO else "<your uploaded folder>"
        try:
            run_name = self.free_run_name((name or "").strip() or training_name(kind, source, demo))
            argv = self.training_argv(kind, data, run_name, values)
            yaml_text = api.config_yaml(argv)  # also checks every option the way the CLI will
        except UserError as error:
            return f"# {error}", ""
        return api.command_line(argv), yaml_text if source == DEMO else UPLOAD_PENDING

    def start_training(
        self, kind: str, source: str, demo: str, files: list | None, name: str, values: dict, owner: str = ""
    ) -> tuple[str, str, str, str]:
        """(job id, status, command, yaml); validates the data and the options before queueing anything."""
        options = form_values(f"train-{kind}", values)
        template, trigger = options.get("template") or "", options.get("trigger") or ""
        self.user(owner)
        folder, note = self.dataset_folder(source, demo, files, kind, template, trigger)
        wanted = (name or "").strip() or training_name(kind, source, demo)
        checked: dict[str, str] = {}

        def make_argv(run_name: str) -> list[str]:
            argv = self.training_argv(kind, str(folder), run_name, options)
            checked["yaml"] = api.config_yaml(argv)  # also checks every option the way the CLI will
            return argv

        try:
            job, run_name, argv = self._submit_training(wanted, make_argv, owner)
        except UserError:
            if source != DEMO:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return job.id, f"queued **{run_name}** ({note})", api.command_line(argv), checked["yaml"]

    def job(self, job_id: str, owner: str = "") -> Job:
        """A job `owner` may follow and cancel (with a login: their own; another's reads as missing)."""
        job = self.jobs.get(job_id)
        if self.per_user and job.owner != self.user(owner):
            raise UserError(f"no job {job_id!r}")
        return job

    def follow(self, job_id: str | None, commands: tuple[str, ...], owner: str = "") -> str | None:
        """The job a tab shows: the one it started, else (a reloaded page, a job resumed from the Runs
        tab) the newest unfinished job of its `commands` that `owner` may see, read from the jobs' records."""
        if job_id:
            return job_id
        job = self.jobs.latest(commands, self.user(owner))
        return job.id if job is not None else None

    def poll(self, job_id: str | None, owner: str = "") -> tuple[str, dict, str | None, str]:
        """(status line, loss plot columns, latest sample image, log tail) of a job."""
        if not job_id:
            return "no job yet", loss_points([]), None, ""
        job = self.job(job_id, owner)
        info = run_info(job.run_dir)
        status = describe(info, job.status)
        if job.status == "failed" and job.error and "error" not in status:
            status += f" · {job.error}"
        if job.status == "interrupted":
            status += " · stopped with a checkpoint: resume it from the Runs tab"
        points = loss_points(events_of(job.run_dir)) if job.run_dir else loss_points([])
        sample = self._served(info.get("latest_sample"))
        return status + sample_note(info.get("latest_sample")), points, sample, job.log_tail(12)

    def cancel(self, job_id: str | None, owner: str = "", commands: tuple[str, ...] = ()) -> str:
        """Cancel a job: the tab's own (`job_id`), else the newest unfinished one of its `commands` that
        `owner` may see (after a page reload the tab has no job id; the job's record is still there)."""
        job_id = self.follow(job_id, commands, owner) if commands else job_id
        if not job_id:
            return "no job to cancel"
        return cancel_message(self.jobs.cancel(self.job(job_id, owner).id))

    def cancel_run(self, run_name: str, owner: str = "") -> str:
        """Cancel the job writing run `run_name` (started by Start or by Resume, by this server or by the
        one before it): the Runs tab's Cancel. The run is the user's, so is the job on it."""
        job = self.run_job(run_name, owner)
        if job is None:
            raise UserError(f"{run_name} has no job queued or running")
        return f"{run_name}: " + cancel_message(self.jobs.cancel(job.id))

    def run_job(self, run_name: str, owner: str = "") -> Job | None:
        """The queued, running or adopted job writing run `run_name`, if any."""
        return self.jobs.active_job(self.workspace.run_dir(run_name, self.user(owner)))

    # -- break-for-make -------------------------------------------------------------------------
    def b4m_argv(self, content: str, style: str, name: str, values: dict[str, Any]) -> list[str]:
        words = self._run_words(B4M_KIND, "--content", content, "--style", style, name=name)
        return command_argv(words, values)

    def preview_b4m(
        self, content: str, style: str, content_files: list | None, style_files: list | None, name: str, values: dict
    ) -> tuple[str, str]:
        sets = api.demo_sets()
        folders = [
            f"<your uploaded {kind} images>" if files else str(sets.get(demo, ""))
            for kind, demo, files in (("content", content, content_files), ("style", style, style_files))
        ]
        try:
            run_name = self.free_run_name((name or "").strip() or b4m_name(content, style, content_files, style_files))
            argv = self.b4m_argv(*folders, run_name, values)
            yaml_text = api.config_yaml(argv)
        except UserError as error:
            return f"# {error}", ""
        return api.command_line(argv), UPLOAD_PENDING if content_files or style_files else yaml_text

    def start_b4m(
        self,
        content: str,
        style: str,
        content_files: list | None,
        style_files: list | None,
        name: str,
        values: dict,
        owner: str = "",
    ) -> tuple[str, str, str, str]:
        """(job id, status, command, yaml) of a Break-for-Make run on demo sets or uploads."""
        options = form_values(B4M_KIND, values)
        self.user(owner)
        folders = []
        for kind, demo, files in (("content", content, content_files), ("style", style, style_files)):
            folders.append(self.dataset_folder("upload" if files else DEMO, demo, files, kind)[0])
        wanted = (name or "").strip() or b4m_name(content, style, content_files, style_files)
        checked: dict[str, str] = {}

        def make_argv(run_name: str) -> list[str]:
            argv = self.b4m_argv(str(folders[0]), str(folders[1]), run_name, options)
            checked["yaml"] = api.config_yaml(argv)
            return argv

        job, run_name, argv = self._submit_training(wanted, make_argv, owner)
        return job.id, f"queued **{run_name}**", api.command_line(argv), checked["yaml"]

    # -- LLM: train-llm and chat ------------------------------------------------------------------
    def llm_argv(self, data: str | None, eval_data: str | None, name: str, values: dict[str, Any]) -> list[str]:
        """The `studio train-llm` command of the LLM form (no data: the embedded task, train-llm's default)."""
        options = adapter_values(LLM_KIND, values, "llm")
        words = [*([data] if data else []), *(["--eval", eval_data] if eval_data else [])]
        return to_argv(self._run_words(LLM_KIND, *words, name=name), api.command_sections(LLM_KIND), options)

    def llm_dataset(self, source: str, train_file: Any, eval_file: Any) -> tuple[str | None, str | None, str]:
        """(training file, held-out file, a note). The embedded task is (None, None): train-llm's own
        default, which also evaluates on the task's test set and the knowledge probe. Uploads (JSONL, JSON,
        CSV or Parquet) are copied into the workspace and checked row by row as the trainer checks them,
        else deleted."""
        if source == LLM_EMBEDDED:
            return None, None, "the embedded addition task, evaluated on its test set and the knowledge probe"
        copied: list[Path] = []
        uploaded = [_file_path(f) for f in (train_file, eval_file) if f]
        try:
            data = self.workspace.ingest_data_file(
                _file_path(train_file) if train_file else "", self.limits, label="llm-train"
            )
            copied.append(data)
            note = f"{api.validate_jsonl(data)} training rows"
            held_out = None
            if eval_file:
                held_out = self.workspace.ingest_data_file(_file_path(eval_file), self.limits, label="llm-eval")
                copied.append(held_out)
                note += f", {api.validate_jsonl(held_out, for_training=False)} held-out rows"
        except UserError:
            for path in copied:
                shutil.rmtree(path.parent, ignore_errors=True)
            self.workspace.discard_upload(uploaded)
            raise
        return str(data), None if held_out is None else str(held_out), note

    def preview_llm(self, source: str, name: str, values: dict) -> tuple[str, str]:
        upload = source != LLM_EMBEDDED
        try:
            options = form_values(LLM_KIND, values)
            method, objective = options.get("adapter.method") or "lora", options.get("train.objective") or "sft"
            run_name = self.free_run_name((name or "").strip() or llm_name(method, upload, objective))
            argv = self.llm_argv("<your-upload.jsonl>" if upload else None, None, run_name, values)
            yaml_text = api.config_yaml(argv)  # also checks every option the way train-llm will
        except UserError as error:
            return f"# {error}", ""
        # The preview names "<your-upload.jsonl>"; the real path exists once the upload is checked.
        return api.command_line(argv), UPLOAD_PENDING if upload else yaml_text

    def start_llm(
        self, source: str, train_file: Any, eval_file: Any, name: str, values: dict, owner: str = ""
    ) -> tuple[str, str, str, str]:
        """(job id, status, command, yaml); the data, the options and the method against the model's
        architecture are all checked before anything is queued."""
        options = form_values(LLM_KIND, values)
        self.user(owner)
        data, held_out, note = self.llm_dataset(source, train_file, eval_file)
        method, objective = options.get("adapter.method") or "lora", options.get("train.objective") or "sft"
        wanted = (name or "").strip() or llm_name(method, data is not None, objective)
        checked: dict[str, str] = {}

        def make_argv(run_name: str) -> list[str]:
            argv = self.llm_argv(data, held_out, run_name, options)
            api.check_llm_command(argv)
            checked["yaml"] = api.config_yaml(argv)
            return argv

        try:
            job, run_name, argv = self._submit_training(wanted, make_argv, owner)
        except UserError:
            for path in (data, held_out):
                if path:
                    shutil.rmtree(Path(path).parent, ignore_errors=True)
            raise
        return job.id, f"queued **{run_name}** ({note})", api.command_line(argv), checked["yaml"]

    def poll_llm(self, job_id: str | None, owner: str = "") -> tuple[str, dict, str, str]:
        """(status line, loss plot columns, held-out metrics table, log tail) of an LLM job."""
        if not job_id:
            return "no job yet", loss_points([]), "", ""
        status, points, _, tail = self.poll(job_id, owner)
        job = self.job(job_id, owner)
        return status, points, eval_table(events_of(job.run_dir)) if job.run_dir else "", tail

    def chat_argv(self, run_name: str | None, values: dict[str, Any], out: Path, owner: str = "") -> list[str]:
        """`studio chat [RUN] --prompt ...` (a prompt starting with "-" as --prompt=...) with its reply file."""
        if not form_values("chat", values).get("prompt"):
            raise UserError("write a prompt")
        words = ["chat"]
        if run_name and run_name != LLM_BASE_ONLY:
            directory = self.workspace.run_dir(run_name, self.user(owner))
            info = run_info(directory)
            if info.get("kind") != LLM_KIND or info.get("status") != "finished":
                raise UserError(
                    f"{run_name} is not a finished LLM run ({info.get('kind')}, {info.get('status')}); "
                    "pick one from the list"
                )
            words.append(str(directory))
        return [*command_argv(words, values), "--out", str(out)]

    def chat(self, run_name: str | None, values: dict, owner: str = "") -> tuple[str, str]:
        """(the model's reply, the `studio chat` command): a quick job in the light lane, like generate."""
        out = self.workspace.new_output(suffix=".json", stem="chat", user=self.user(owner))
        argv = self.chat_argv(run_name, values, out, owner)
        self.run_light(argv, owner=owner)
        replies = json.loads(out.read_text(encoding="utf-8"))["replies"]
        empty = "(an empty reply: the model ended its turn at once)"
        if len(replies) == 1:
            return replies[0]["reply"] or empty, api.command_line(argv)
        text = "\n\n".join(f"> {r['prompt']}\n{r['reply'] or empty}" for r in replies)
        return text, api.command_line(argv)

    # -- generate / compose / export / analyze (quick jobs in the "light" lane) --------------------
    def generate_argv(
        self, adapters: list[tuple[str, float]], values: dict[str, Any], out: Path, owner: str = ""
    ) -> list[str]:
        if not form_values("generate", values).get("prompt"):
            raise UserError("write a prompt (one per line for several images)")
        argv = [*command_argv(["generate"], values), "--out", str(out)]
        for run_name, weight in adapters:
            argv += ["--adapter", f"{self.workspace.run_dir(run_name, self.user(owner))}:{float(weight)}"]
        return argv

    def generate(self, adapters: list[tuple[str, float]], values: dict[str, Any], owner: str = "") -> tuple[str, str]:
        """(image, the `studio generate` command): a quick job in the light lane."""
        out = self.workspace.new_output(stem="generate", user=self.user(owner))
        argv = self.generate_argv(adapters, values, out, owner)
        self.run_light(argv, owner=owner)
        return str(out), api.command_line(argv)

    def compose_argv(self, run_name: str, values: dict[str, Any], out: Path, owner: str = "") -> list[str]:
        directory = self.workspace.run_dir(run_name, self.user(owner))
        if not (directory / "b4m").is_dir():
            raise UserError(f"{run_name} has no Break-for-Make adapters (yet); pick a finished break-for-make run")
        values = form_values("compose", values)
        values["prompt"] = values.get("prompt") or ["a moon in neon style"]
        return [*command_argv(["compose", "--b4m", str(directory)], values), "--out", str(out)]

    def compose(self, run_name: str, values: dict[str, Any], owner: str = "") -> str:
        """The image `studio compose` makes with a finished Break-for-Make run."""
        out = self.workspace.new_output(stem=f"compose-{run_name}", user=self.user(owner))
        self.run_light(self.compose_argv(run_name, values, out, owner), owner=owner)
        return str(out)

    def compose_pair_argv(
        self, content: RunPick, style: RunPick, values: dict[str, Any], out: Path, owner: str = ""
    ) -> list[str]:
        """`studio compose --content RUN:W --style RUN:W [--combine ziplora ...]` of two of the user's runs,
        each picked as (run name, weight)."""
        missing = [kind for kind, (run, _) in (("content", content), ("style", style)) if run in (None, "", NO_ADAPTER)]
        if missing:
            raise UserError(
                f"pick a {' and a '.join(missing)} run: compose needs both a content run and a style run "
                "(finished train-content / train-style runs)"
            )
        options = form_values("compose-pair", values)
        if not options.get("prompt"):
            raise UserError("write a prompt (one per line for several images)")
        user = self.user(owner)
        words = ["compose"]
        for kind, (run, weight) in (("content", content), ("style", style)):
            words += [f"--{kind}", f"{self.workspace.run_dir(run, user)}:{adapter_weight(weight, kind)}"]
        return [*command_argv(words, options, form="compose-pair"), "--out", str(out)]

    def compose_pair(
        self, content: RunPick, style: RunPick, values: dict[str, Any], owner: str = ""
    ) -> tuple[str, str]:
        """(image, the `studio compose` command) of a content run and a style run, summed or ZipLoRA-merged:
        a quick job in the light lane, like generate."""
        out = self.workspace.new_output(stem="compose-pair", user=self.user(owner))
        argv = self.compose_pair_argv(content, style, values, out, owner)
        # A ZipLoRA merge trains its merger vectors first (100 steps: minutes on a small CPU).
        ziplora = form_values("compose-pair", values).get("combine") == "ziplora"
        self.run_light(argv, owner=owner, timeout=3600.0 if ziplora else 600.0)
        return str(out), api.command_line(argv)

    def run_light(self, argv: list[str], owner: str = "", timeout: float = 600.0) -> Job:
        """Queue a quick command and wait for it (the handler thread sleeps; the work is in a worker)."""
        api.check_command(argv)
        job = self.jobs.submit(argv, lane="light", owner=owner)
        try:
            job = self.jobs.wait(job.id, timeout=timeout)
        except TimeoutError:
            self.jobs.cancel(job.id)  # nobody is waiting for its picture any more
            raise UserError(
                f"`{api.command_line(argv)}` ran longer than {timeout / 60:.0f} minutes and was stopped; "
                "ask for less (fewer steps or pictures), or run the command in a terminal"
            ) from None
        if job.status != "finished":
            raise UserError(job.error or f"the job {job.status}")
        return job

    def export(self, run_name: str, fmt: str, owner: str = "") -> str:
        user = self.user(owner)
        directory = self.workspace.run_dir(run_name, user)
        if run_info(directory).get("kind") == LLM_KIND:
            # train-llm writes its PEFT export itself (it knows the LM); `studio export` is for diffusion bases.
            if fmt != "peft" or not (directory / "peft").is_dir():
                raise UserError(
                    f"{run_name} is an LLM run: it exports to PEFT while it trains (tick 'Export peft' in "
                    "the LLM tab, i.e. `studio train-llm --export-peft`); its peft_core adapter is in "
                    "adapter/default"
                )
            out = self.workspace.new_output(suffix="", stem=f"{run_name}-peft", user=user)
            return shutil.make_archive(str(out), "zip", root_dir=directory / "peft")
        out = self.workspace.outputs_of(user) / f"{run_name}-{fmt}"
        shutil.rmtree(out, ignore_errors=True)
        self.run_light(["export", str(directory), "--format", fmt, "--out", str(out)], owner=owner)
        return shutil.make_archive(str(out), "zip", root_dir=out)

    def analyze_argv(self, run_name: str | None, values: dict[str, Any], out: Path, owner: str = "") -> list[str]:
        model = form_values("analyze", values).get("model") or "embedded-lm"
        if model not in ANALYZE_MODELS:
            raise UserError(f"model must be one of {', '.join(ANALYZE_MODELS)}, not {model!r}")
        words = ["analyze", "--out", str(out)]
        if run_name and run_name != NO_ADAPTER:
            words += ["--adapter", str(self.workspace.run_dir(run_name, self.user(owner)))]
        return command_argv(words, values)

    def analyze(self, run_name: str | None, values: dict, owner: str = "") -> tuple[str, str, str]:
        """(heatmap image, the per-head table, report.json) of `studio analyze` on a base (+ a run's adapter)."""
        out = self.workspace.new_output(suffix="", stem=f"analysis-{run_name or 'base'}", user=self.user(owner))
        job = self.run_light(self.analyze_argv(run_name, values, out, owner), owner=owner)
        table = job.log_path.read_text(encoding="utf-8", errors="replace")
        return str(out / "heatmap.png"), table, str(out / "report.json")

    # -- runs -----------------------------------------------------------------------------------
    def runs_table(self, owner: str = "") -> list[list[Any]]:
        rows = []
        for run in self.workspace.list_runs(self.user(owner)):
            steps = f"{run.get('step', 0)}/{run['total_steps']}" if run.get("total_steps") else ""
            loss = f"{run['loss']:.4f}" if isinstance(run.get("loss"), float) else ""
            updated = time.localtime(run.get("updated", run.get("created", 0)))
            rows.append(
                [
                    run["name"],
                    run.get("kind", ""),
                    run.get("status", ""),
                    steps,
                    loss,
                    time.strftime("%Y-%m-%d %H:%M", updated),
                ]
            )
        return rows

    def run_names(self, kinds: tuple[str, ...] | None = None, status: str | None = None, owner: str = "") -> list[str]:
        return [
            r["name"]
            for r in self.workspace.list_runs(self.user(owner))
            if (kinds is None or r.get("kind") in kinds) and (status is None or r.get("status") == status)
        ]

    def run_details(self, run_name: str, owner: str = "") -> tuple[str, list[str], str]:
        """(summary, sample images, config.yaml) of a run."""
        directory = self.workspace.run_dir(run_name, self.user(owner))
        info = run_info(directory)
        samples = sorted((directory / "samples").glob("*.png")) if (directory / "samples").is_dir() else []
        config_path = directory / "config.yaml"
        config = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
        job = self.jobs.active_job(directory)
        summary = f"### {run_name}\n{info.get('kind', '')} · " + describe(info, job.status if job else None)
        if info.get("kind") == LLM_KIND:
            table = eval_table(events_of(directory))
            summary += ("\n\n" + table if table else "") + "\n\nTalk to it in the LLM tab's chat box."
        return summary, [str(self.workspace.inside(p)) for p in samples], config

    def resume(self, run_name: str, owner: str = "") -> str:
        directory = self.workspace.run_dir(run_name, self.user(owner))
        info = run_info(directory)
        if info.get("kind") not in RESUMABLE_KINDS:
            raise UserError(
                f"{run_name} is a {info.get('kind')} run; only style/content/LLM/Break-for-Make trainings resume"
            )
        if info.get("status") == "finished":
            raise UserError(f"{run_name} has finished; nothing to resume")
        writer = run_writer(directory)
        if writer is not None and self.jobs.active_job(directory) is None:
            raise UserError(f"{run_name} is being written by process {writer} (outside this server); wait for it")
        argv = [info["kind"], "--resume", str(directory)]
        job = self.jobs.submit(argv, lane="train", owner=owner, run_dir=directory, stoppable=True)
        return job.id

    def delete(self, run_name: str, confirmed: bool, owner: str = "") -> str:
        if not confirmed:
            raise UserError("tick the confirmation box first: deleting removes the run folder for good")
        user = self.user(owner)
        directory = self.workspace.run_dir(run_name, user)
        if directory in self.jobs.active_run_dirs() or run_writer(directory) is not None:
            raise UserError(f"{run_name} has a job queued or running; cancel it first")
        self.workspace.delete_run(run_name, user)
        return f"deleted {run_name}"

    def _served(self, path: str | None) -> str | None:
        """A file the browser may fetch: only existing files inside the workspace."""
        if not path:
            return None
        try:
            resolved = self.workspace.inside(path)
        except UserError:
            return None
        return str(resolved) if resolved.is_file() else None


def _file_path(item: Any) -> str:
    return item if isinstance(item, str) else getattr(item, "name", None) or getattr(item, "path", None) or str(item)
