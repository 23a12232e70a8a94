"""The Gradio studio: layout and event handlers. It calls studio's API only (studio.ui_cmd,
studio.runs) and runs every job as a `studio ...` command in a worker process (ui/jobs.py).

    from ui.app import launch
    launch(Path("studio-workspace"))          # what `studio ui` does

`Studio` holds the server-side state and every handler as a plain method (unit-testable without a
browser); `build_app` lays the tabs out and wires the handlers to the components.
"""

import functools
import inspect
import json
import keyword
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from studio import ui_cmd
from studio.errors import UserError
from studio.runs import safe_run_name
from ui.jobs import Job, JobManager
from ui.progress import describe, eval_table, events_of, loss_points, run_info
from ui.workspace import UPLOAD_SUFFIXES, UploadLimits, Workspace

TRAIN_KINDS = ("train-style", "train-content")
LLM_KIND = "train-llm"
B4M_KIND = "break-for-make"
RESUMABLE_KINDS = (*TRAIN_KINDS, LLM_KIND, B4M_KIND)  # the kinds whose training stops on STOP with a checkpoint
LLM_EMBEDDED = "embedded task"
LLM_BASE_ONLY = "(the embedded base, no adapter)"
SCHEDULES = ("constant", "cosine", "linear")
ADAPTER_SLOTS = 3  # adapters the Generate tab composes at once


class Studio:
    def __init__(
        self,
        workspace: Path,
        max_jobs: int = 1,
        max_queued: int = 8,
        max_upload_mb: float = 20.0,
        stop_grace_s: float = 120.0,
    ) -> None:
        self.workspace = Workspace(workspace)
        self.limits = UploadLimits(max_file_bytes=int(max_upload_mb * 2**20))
        self.jobs = JobManager(
            {"train": max_jobs, "light": 1},
            jobs_dir=self.workspace.jobs,
            max_queued=max_queued,
            stop_grace_s=stop_grace_s,
        )
        # Held from choosing a free run name to queueing the job, so two users asking for the same
        # name at the same moment get two run folders ("x", "x-2") instead of one refused job.
        self._naming = threading.RLock()

    # -- training (style / content) -------------------------------------------------------------
    def training_argv(
        self,
        kind: str,
        data: str,
        name: str,
        template: str,
        trigger: str,
        method: str,
        rank: float,
        alpha: float,
        extra: str,
        steps: float,
        batch_size: float,
        learning_rate: float,
        lr_schedule: str,
        seed: float,
        checkpoint_every: float,
        sample_every: float,
        sample_prompts: str,
        sample_steps: float,
    ) -> list[str]:
        if kind not in ("style", "content"):
            raise UserError(f"kind must be style or content, not {kind!r}")
        template, trigger, extra, sample_prompts = (text or "" for text in (template, trigger, extra, sample_prompts))
        argv = [
            f"train-{kind}",
            data,
            "--runs-dir",
            str(self.workspace.runs),
            "--name",
            name,
            "--method",
            method or "lora",
            "--rank",
            _int(rank, "rank"),
            "--alpha",
            _float(alpha, "alpha"),
            "--steps",
            _int(steps, "steps"),
            "--batch-size",
            _int(batch_size, "batch size"),
            "--learning-rate",
            _float(learning_rate, "learning rate"),
            "--lr-schedule",
            lr_schedule or "constant",
            "--seed",
            _int(seed, "seed"),
            "--checkpoint-every",
            _int(checkpoint_every, "checkpoint every"),
            "--sample-every",
            _int(sample_every, "sample every"),
            "--sample-steps",
            _int(sample_steps, "sample steps"),
        ]
        if template.strip():
            argv += ["--template", template.strip()]
        if trigger.strip():
            argv += ["--trigger", trigger.strip()]
        prompts = [line.strip() for line in sample_prompts.splitlines() if line.strip()]
        if prompts:
            argv += ["--sample-prompts", *prompts]
        for line in extra.splitlines():
            if line.strip():
                argv += ["--set", line.strip()]
        return argv

    def dataset_folder(
        self, source: str, demo: str, files: list | None, kind: str, template: str = "", trigger: str = ""
    ) -> tuple[Path, str]:
        """(validated training folder, a note on it) from a demo-set name or uploaded files."""
        if source == "demo set":
            sets = ui_cmd.demo_sets()
            if demo not in sets:
                raise UserError(f"no shipped set named {demo!r}; choose one of {', '.join(sets)}")
            folder = sets[demo]
        else:
            folder = self.workspace.ingest_upload([_file_path(f) for f in files or []], self.limits, label=kind)
        try:
            count, warnings = ui_cmd.validate_dataset(folder, template, trigger)
        except UserError:
            if source != "demo set":
                shutil.rmtree(folder, ignore_errors=True)
            raise
        note = f"{count} images" + (f"; warnings: {'; '.join(warnings)}" if warnings else "")
        return folder, note

    def preview_training(self, kind: str, source: str, demo: str, name: str, *options) -> tuple[str, str]:
        data = str(ui_cmd.demo_sets().get(demo, "")) if source == "demo set" else "<your uploaded folder>"
        try:
            argv = self.training_argv(kind, data, safe_run_name(name or f"{kind}-{demo}"), *options)
            command = ui_cmd.command_line(argv)
            yaml_text = ui_cmd.config_yaml(argv) if source == "demo set" else "(shown once the upload is checked)"
        except UserError as error:
            return f"# {error}", ""
        return command, yaml_text

    def start_training(
        self, kind: str, source: str, demo: str, files: list | None, name: str, *options, owner: str = ""
    ) -> tuple[str, str, str, str]:
        """(job id, status, command, yaml); validates the data and the options before queueing anything."""
        template, trigger = options[0], options[1]
        folder, note = self.dataset_folder(source, demo, files, kind, template, trigger)
        wanted = (name or "").strip() or (
            demo if source == "demo set" and demo.startswith(kind) else f"{kind}-{folder.name}"
        )
        with self._naming:
            run_name = self.workspace.unique_run_name(wanted, {p.name for p in self.jobs.active_run_dirs()})
            argv = self.training_argv(kind, str(folder), run_name, *options)
            yaml_text = ui_cmd.config_yaml(argv)  # also checks every option the way the CLI will
            job = self.jobs.submit(
                argv, lane="train", owner=owner, run_dir=self.workspace.runs / run_name, stoppable=True
            )
        return job.id, f"queued **{run_name}** ({note})", ui_cmd.command_line(argv), yaml_text

    def poll(self, job_id: str | None) -> tuple[str, dict, str | None, str]:
        """(status line, loss plot columns, latest sample image, log tail) of a job."""
        if not job_id:
            return "no job yet", loss_points([]), None, ""
        job = self.jobs.get(job_id)
        info = run_info(job.run_dir)
        status = describe(info, job.status)
        if job.status == "failed" and job.error and "error" not in status:
            status += f" · {job.error}"
        if job.status == "interrupted":
            status += " · stopped with a checkpoint: resume it from the Runs tab"
        points = loss_points(events_of(job.run_dir)) if job.run_dir else loss_points([])
        sample = self._served(info.get("latest_sample"))
        return status, points, sample, job.log_tail(12)

    def cancel(self, job_id: str | None) -> str:
        if not job_id:
            return "no job to cancel"
        job = self.jobs.cancel(job_id)
        return {"cancelled": "cancelled before it started", "stopping": "stopping: writing a checkpoint"}.get(
            job.status, job.status
        )

    # -- break-for-make -------------------------------------------------------------------------
    def start_b4m(
        self,
        content: str,
        style: str,
        content_files: list | None,
        style_files: list | None,
        name: str,
        break_steps: float,
        make_steps: float,
        rank: float,
        batch_size: float,
        prompt: str,
        owner: str = "",
    ) -> tuple[str, str, str]:
        folders = []
        for kind, demo, files in (("content", content, content_files), ("style", style, style_files)):
            source = "upload" if files else "demo set"
            folders.append(self.dataset_folder(source, demo, files, kind)[0])
        wanted = (name or "").strip() or f"b4m-{folders[0].name}-{folders[1].name}"
        with self._naming:
            run_name = self.workspace.unique_run_name(wanted, {p.name for p in self.jobs.active_run_dirs()})
            argv = [
                "break-for-make",
                "--content",
                str(folders[0]),
                "--style",
                str(folders[1]),
                "--runs-dir",
                str(self.workspace.runs),
                "--name",
                run_name,
                "--break-steps",
                _int(break_steps, "break steps"),
                "--make-steps",
                _int(make_steps, "make steps"),
                "--rank",
                _int(rank, "rank"),
                "--batch-size",
                _int(batch_size, "batch size"),
            ]
            if (prompt or "").strip():
                argv += ["--prompt", prompt.strip()]
            ui_cmd.check_command(argv)
            job = self.jobs.submit(
                argv, lane="train", owner=owner, run_dir=self.workspace.runs / run_name, stoppable=True
            )
        return job.id, f"queued **{run_name}**", ui_cmd.command_line(argv)

    # -- LLM: train-llm and chat ------------------------------------------------------------------
    def llm_argv(
        self,
        data: str | None,
        eval_data: str | None,
        name: str,
        method: str,
        rank: float,
        alpha: float,
        loram_ratio: float,
        extra: str,
        export_peft: bool,
        steps: float,
        batch_size: float,
        learning_rate: float,
        lr_schedule: str,
        warmup_steps: float,
        max_length: float,
        seed: float,
        checkpoint_every: float,
    ) -> list[str]:
        """The `studio train-llm` command of the LLM form (no data: the embedded task, train-llm's default)."""
        method = method or "lora"
        defaults = ui_cmd.llm_defaults(method)
        argv = [
            "train-llm",
            *([data] if data else []),
            *(["--eval", eval_data] if eval_data else []),
            "--runs-dir",
            str(self.workspace.runs),
            "--name",
            name,
            "--method",
            method,
        ]
        # Rank and alpha only where the trainer gives the method one (Compacter has neither; its
        # sizes are KEY=VALUE hyperparameters such as n or reduction_factor).
        if defaults["rank"] is not None:
            argv += ["--rank", _int(rank, "rank")]
        if defaults["alpha"] is not None:
            argv += ["--alpha", _float(alpha, "alpha")]
        if loram_ratio and float(loram_ratio) > 0:
            argv += ["--loram-ratio", _float(loram_ratio, "LoRAM ratio")]
        if export_peft:
            argv.append("--export-peft")
        argv += [
            "--steps",
            _int(steps, "steps"),
            "--batch-size",
            _int(batch_size, "batch size"),
            "--learning-rate",
            _float(learning_rate, "learning rate"),
            "--lr-schedule",
            lr_schedule or "cosine",
            "--warmup-steps",
            _int(warmup_steps, "warm-up steps"),
            "--max-length",
            _int(max_length, "max length"),
            "--seed",
            _int(seed, "seed"),
            "--checkpoint-every",
            _int(checkpoint_every, "checkpoint every"),
        ]
        for line in (extra or "").splitlines():
            if line.strip():
                argv += ["--set", line.strip()]
        return argv

    def llm_dataset(self, source: str, train_file: Any, eval_file: Any) -> tuple[str | None, str | None, str]:
        """(training JSONL, held-out JSONL, a note). The embedded task is (None, None): train-llm's own
        default, which also evaluates on the task's test set and the knowledge probe. Uploads are
        copied into the workspace and checked line by line as the trainer checks them, else deleted."""
        if source == LLM_EMBEDDED:
            return None, None, "the embedded addition task, evaluated on its test set and the knowledge probe"
        copied: list[Path] = []
        try:
            data = self.workspace.ingest_jsonl(
                _file_path(train_file) if train_file else "", self.limits, label="llm-train"
            )
            copied.append(data)
            note = f"{ui_cmd.validate_jsonl(data)} training rows"
            held_out = None
            if eval_file:
                held_out = self.workspace.ingest_jsonl(_file_path(eval_file), self.limits, label="llm-eval")
                copied.append(held_out)
                note += f", {ui_cmd.validate_jsonl(held_out, for_training=False)} held-out rows"
        except UserError:
            for path in copied:
                shutil.rmtree(path.parent, ignore_errors=True)
            raise
        return str(data), None if held_out is None else str(held_out), note

    def preview_llm(self, source: str, name: str, *options) -> tuple[str, str]:
        upload = source != LLM_EMBEDDED
        try:
            run_name = safe_run_name(name or f"llm-{options[0] or 'lora'}-{'upload' if upload else 'task_add_train'}")
            argv = self.llm_argv("<your-upload.jsonl>" if upload else None, None, run_name, *options)
            command = ui_cmd.command_line(argv)
            yaml_text = ui_cmd.config_yaml(argv)  # also checks every option the way train-llm will
            if upload:  # the preview names "<your-upload.jsonl>"; the real path exists once the upload is checked
                yaml_text = "(shown once the upload is checked)"
        except UserError as error:
            return f"# {error}", ""
        return command, yaml_text

    def start_llm(
        self, source: str, train_file: Any, eval_file: Any, name: str, *options, owner: str = ""
    ) -> tuple[str, str, str, str]:
        """(job id, status, command, yaml); the data, the options and the method against the model's
        architecture are all checked before anything is queued."""
        data, held_out, note = self.llm_dataset(source, train_file, eval_file)
        stem = Path(data).stem if data else "task_add_train"
        wanted = (name or "").strip() or f"llm-{options[0] or 'lora'}-{stem}"
        try:
            with self._naming:
                run_name = self.workspace.unique_run_name(wanted, {p.name for p in self.jobs.active_run_dirs()})
                argv = self.llm_argv(data, held_out, run_name, *options)
                ui_cmd.check_llm_command(argv)
                yaml_text = ui_cmd.config_yaml(argv)
                job = self.jobs.submit(
                    argv, lane="train", owner=owner, run_dir=self.workspace.runs / run_name, stoppable=True
                )
        except UserError:
            for path in (data, held_out):
                if path:
                    shutil.rmtree(Path(path).parent, ignore_errors=True)
            raise
        return job.id, f"queued **{run_name}** ({note})", ui_cmd.command_line(argv), yaml_text

    def poll_llm(self, job_id: str | None) -> tuple[str, dict, str, str]:
        """(status line, loss plot columns, held-out metrics table, log tail) of an LLM job."""
        if not job_id:
            return "no job yet", loss_points([]), "", ""
        status, points, _, tail = self.poll(job_id)
        job = self.jobs.get(job_id)
        return status, points, eval_table(events_of(job.run_dir)) if job.run_dir else "", tail

    def chat_argv(
        self,
        run_name: str | None,
        prompt: str,
        use_template: bool,
        max_new_tokens: float,
        temperature: float,
        out: Path,
    ) -> list[str]:
        prompt = (prompt or "").strip()
        if not prompt:
            raise UserError("write a prompt")
        argv = ["chat"]
        if run_name and run_name != LLM_BASE_ONLY:
            directory = self.workspace.run_dir(run_name)
            info = run_info(directory)
            if info.get("kind") != LLM_KIND or info.get("status") != "finished":
                raise UserError(
                    f"{run_name} is not a finished LLM run ({info.get('kind')}, {info.get('status')}); "
                    "pick one from the list"
                )
            argv.append(str(directory))
        # "--prompt=..." only where the prompt starts with "-", which argparse would take for an option.
        argv += [
            *([f"--prompt={prompt}"] if prompt.startswith("-") else ["--prompt", prompt]),
            "--max-new-tokens",
            _int(max_new_tokens, "max new tokens"),
            "--temperature",
            _float(temperature, "temperature"),
            "--out",
            str(out),
        ]
        if not use_template:
            argv.append("--raw")
        return argv

    def chat(
        self,
        run_name: str | None,
        prompt: str,
        use_template: bool,
        max_new_tokens: float,
        temperature: float,
        owner: str = "",
    ) -> tuple[str, str]:
        """(the model's reply, the `studio chat` command): a quick job in the light lane, like generate."""
        out = self.workspace.new_output(suffix=".json", stem="chat")
        argv = self.chat_argv(run_name, prompt, use_template, max_new_tokens, temperature, out)
        self.run_light(argv, owner=owner)
        reply = json.loads(out.read_text(encoding="utf-8"))["replies"][0]["reply"]
        return reply or "(an empty reply: the model ended its turn at once)", ui_cmd.command_line(argv)

    # -- generate / compose / export (quick jobs in the "light" lane) ------------------------------
    def generate_argv(
        self, adapters: list[tuple[str, float]], prompt: str, seed: float, steps: float, guidance: float, out: Path
    ) -> list[str]:
        prompts = [line.strip() for line in (prompt or "").splitlines() if line.strip()]
        if not prompts:
            raise UserError("write a prompt (one per line for several images)")
        argv = [
            "generate",
            *sum((["--prompt", p] for p in prompts), []),
            "--seed",
            _int(seed, "seed"),
            "--steps",
            _int(steps, "steps"),
            "--guidance",
            _float(guidance, "guidance"),
            "--out",
            str(out),
        ]
        for run_name, weight in adapters:
            argv += ["--adapter", f"{self.workspace.run_dir(run_name)}:{float(weight)}"]
        return argv

    def compose_argv(
        self, run_name: str, content_weight: float, style_weight: float, prompt: str, seed: float, out: Path
    ) -> list[str]:
        directory = self.workspace.run_dir(run_name)
        if not (directory / "b4m").is_dir():
            raise UserError(f"{run_name} has no Break-for-Make adapters (yet); pick a finished break-for-make run")
        prompts = [line.strip() for line in (prompt or "").splitlines() if line.strip()] or ["a moon in neon style"]
        return [
            "compose",
            "--b4m",
            str(directory),
            "--content-weight",
            _float(content_weight, "content weight"),
            "--style-weight",
            _float(style_weight, "style weight"),
            *sum((["--prompt", p] for p in prompts), []),
            "--seed",
            _int(seed, "seed"),
            "--out",
            str(out),
        ]

    def run_light(self, argv: list[str], owner: str = "", timeout: float = 600.0) -> Job:
        """Queue a quick command and wait for it (the handler thread sleeps; the work is in a worker)."""
        ui_cmd.check_command(argv)
        job = self.jobs.submit(argv, lane="light", owner=owner)
        job = self.jobs.wait(job.id, timeout=timeout)
        if job.status != "finished":
            raise UserError(job.error or f"the job {job.status}")
        return job

    def export(self, run_name: str, fmt: str, owner: str = "") -> str:
        directory = self.workspace.run_dir(run_name)
        if run_info(directory).get("kind") == LLM_KIND:
            # train-llm writes its PEFT export itself (it knows the LM); `studio export` is for diffusion bases.
            if fmt != "peft" or not (directory / "peft").is_dir():
                raise UserError(
                    f"{run_name} is an LLM run: it exports to PEFT while it trains (tick 'Also export "
                    "in PEFT format' in the LLM tab, i.e. `studio train-llm --export-peft`); its peft_core "
                    "adapter is in adapter/default"
                )
            out = self.workspace.new_output(suffix="", stem=f"{run_name}-peft")
            return shutil.make_archive(str(out), "zip", root_dir=directory / "peft")
        out = self.workspace.outputs / f"{run_name}-{fmt}"
        shutil.rmtree(out, ignore_errors=True)
        self.run_light(["export", str(directory), "--format", fmt, "--out", str(out)], owner=owner)
        return shutil.make_archive(str(out), "zip", root_dir=out)

    def analyze(
        self, model: str, run_name: str | None, batches: float, steps: float, owner: str = ""
    ) -> tuple[str, str, str]:
        """(heatmap image, the per-head table, report.json) of `studio analyze` on a base (+ a run's adapter)."""
        if model not in ("embedded-sd", "embedded-lm"):
            raise UserError(f"model must be embedded-sd or embedded-lm, not {model!r}")
        out = self.workspace.new_output(suffix="", stem=f"analysis-{run_name or model}")
        argv = ["analyze", "--model", model, "--batches", _int(batches, "batches"), "--out", str(out)]
        if model == "embedded-sd":
            argv += ["--steps", _int(steps, "steps")]
        if run_name and run_name != "(none)":
            argv += ["--adapter", str(self.workspace.run_dir(run_name))]
        job = self.run_light(argv, owner=owner)
        table = job.log_path.read_text(encoding="utf-8", errors="replace")
        return str(out / "heatmap.png"), table, str(out / "report.json")

    # -- runs -----------------------------------------------------------------------------------
    def runs_table(self) -> list[list[Any]]:
        rows = []
        for run in self.workspace.list_runs():
            steps = f"{run.get('step', 0)}/{run['total_steps']}" if run.get("total_steps") else ""
            loss = f"{run['loss']:.4f}" if isinstance(run.get("loss"), float) else ""
            rows.append(
                [
                    run["name"],
                    run.get("kind", ""),
                    run.get("status", ""),
                    steps,
                    loss,
                    time.strftime("%Y-%m-%d %H:%M", time.localtime(run.get("updated", run.get("created", 0)))),
                ]
            )
        return rows

    def run_names(self, kinds: tuple[str, ...] | None = None, status: str | None = None) -> list[str]:
        return [
            r["name"]
            for r in self.workspace.list_runs()
            if (kinds is None or r.get("kind") in kinds) and (status is None or r.get("status") == status)
        ]

    def run_details(self, run_name: str) -> tuple[str, list[str], str]:
        """(summary, sample images, config.yaml) of a run."""
        directory = self.workspace.run_dir(run_name)
        info = run_info(directory)
        samples = sorted((directory / "samples").glob("*.png")) if (directory / "samples").is_dir() else []
        config = (
            (directory / "config.yaml").read_text(encoding="utf-8") if (directory / "config.yaml").is_file() else ""
        )
        summary = f"### {run_name}\n{info.get('kind', '')} · " + describe(info)
        if info.get("kind") == LLM_KIND:
            table = eval_table(events_of(directory))
            summary += ("\n\n" + table if table else "") + "\n\nTalk to it in the LLM tab's chat box."
        return summary, [str(self.workspace.inside(p)) for p in samples], config

    def resume(self, run_name: str, owner: str = "") -> str:
        directory = self.workspace.run_dir(run_name)
        info = run_info(directory)
        if info.get("kind") not in RESUMABLE_KINDS:
            raise UserError(
                f"{run_name} is a {info.get('kind')} run; only style/content/LLM/Break-for-Make trainings resume"
            )
        if info.get("status") == "finished":
            raise UserError(f"{run_name} has finished; nothing to resume")
        argv = [info["kind"], "--resume", str(directory)]
        job = self.jobs.submit(argv, lane="train", owner=owner, run_dir=directory, stoppable=True)
        return job.id

    def delete(self, run_name: str, confirmed: bool) -> str:
        if not confirmed:
            raise UserError("tick the confirmation box first: deleting removes the run folder for good")
        directory = self.workspace.run_dir(run_name)
        if directory in self.jobs.active_run_dirs():
            raise UserError(f"{run_name} has a job queued or running; cancel it first")
        self.workspace.delete_run(run_name)
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


def _int(value: Any, label: str) -> str:
    if value is None or value == "" or float(value) != int(float(value)):
        raise UserError(f"{label}: enter a whole number")
    return str(int(float(value)))


def _float(value: Any, label: str) -> str:
    if value is None or value == "":
        raise UserError(f"{label}: enter a number")
    return str(float(value))


def _file_path(item: Any) -> str:
    return item if isinstance(item, str) else getattr(item, "name", None) or getattr(item, "path", None) or str(item)


# -- layout ----------------------------------------------------------------------------------------
def build_app(studio: Studio):
    import gradio as gr
    import pandas as pd

    def guarded(function):
        """Show UserErrors as a message in the page rather than a stack trace."""

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except UserError as error:
                raise gr.Error(str(error), print_exception=False) from None

        return wrapper

    def owner_of(request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or ""

    def with_owner(function, components: list):
        """(handler, inputs) calling function(*values, owner=<browser session>).

        gradio injects a gr.Request only into a named positional parameter, so the handler's
        signature is spelled out: one parameter per component, named after its label, then the
        request. gradio_client callers thus get the form's fields in order, under readable names."""
        names: list[str] = []
        for index, component in enumerate(components):
            name = re.sub(r"\W+", "_", str(getattr(component, "label", "") or "").lower()).strip("_")[:40]
            if not name.isidentifier() or keyword.iskeyword(name) or name in (*names, "request"):
                name = f"{name or 'input'}_{index}"
            names.append(name)

        def handler(*values):
            *inputs, request = values
            return function(*inputs, owner=owner_of(request))

        positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
        handler.__signature__ = inspect.Signature(
            [inspect.Parameter(n, positional) for n in names]
            + [inspect.Parameter("request", positional, annotation=gr.Request)]
        )
        handler.__annotations__ = {"request": gr.Request}
        handler.__name__ = function.__name__  # the default API name
        return guarded(handler), list(components)

    def plot_frame(points: dict) -> pd.DataFrame:
        return pd.DataFrame(points, columns=["step", "loss", "stage"])

    methods = ui_cmd.trainable_methods()
    defaults = {kind: ui_cmd.train_defaults(kind) for kind in ("style", "content")}
    lora = ui_cmd.method_defaults("lora")
    b4m = ui_cmd.b4m_defaults()
    llm = ui_cmd.llm_defaults("lora")
    demo_names = list(ui_cmd.demo_sets())

    with gr.Blocks(title="peft-studio") as app:
        gr.Markdown(
            f"# peft-studio\nWorkspace: `{studio.workspace.root}` · every job is a `studio` command; "
            "the command and its YAML are shown beside each form."
        )
        with gr.Tabs():
            # ---------------------------------------------------------------- training
            with gr.Tab("Style / Content training", id="train"):
                job_id = gr.State(None)
                with gr.Row():
                    with gr.Column(scale=1):
                        kind = gr.Radio(["style", "content"], value="style", label="What to learn")
                        source = gr.Radio(["demo set", "upload"], value="demo set", label="Training images")
                        demo = gr.Dropdown(demo_names, value=ui_cmd.default_demo_set("style"), label="Shipped demo set")
                        files = gr.File(
                            file_count="multiple",
                            file_types=list(UPLOAD_SUFFIXES),
                            visible=False,
                            label="Images with .txt captions or a metadata.jsonl",
                        )
                        name = gr.Textbox(label="Run name (optional)", placeholder="style-neon")
                        with gr.Row():
                            template = gr.Textbox(
                                label="Prompt template (optional)", placeholder="a {caption} in {trigger} style"
                            )
                            trigger = gr.Textbox(label="Trigger word (optional)")
                        with gr.Accordion("Method", open=False):
                            method = gr.Dropdown(methods, value="lora", label="Method")
                            with gr.Row():
                                rank = gr.Number(defaults["style"]["rank"], precision=0, label="Rank r")
                                alpha = gr.Number(defaults["style"]["alpha"], label="Alpha")
                            extra = gr.Textbox(
                                lines=2, label="Other hyperparameters (KEY=VALUE per line)", placeholder="dropout=0.1"
                            )
                            method_help = gr.Markdown(_defaults_text("lora", lora))
                        with gr.Accordion("Training", open=True):
                            with gr.Row():
                                steps = gr.Number(defaults["style"]["steps"], precision=0, label="Steps")
                                batch_size = gr.Number(defaults["style"]["batch_size"], precision=0, label="Batch size")
                                learning_rate = gr.Number(defaults["style"]["learning_rate"], label="Learning rate")
                            with gr.Row():
                                lr_schedule = gr.Dropdown(list(SCHEDULES), value="constant", label="LR schedule")
                                seed = gr.Number(0, precision=0, label="Seed")
                                checkpoint_every = gr.Number(
                                    defaults["style"]["checkpoint_every"], precision=0, label="Checkpoint every"
                                )
                            with gr.Row():
                                sample_every = gr.Number(0, precision=0, label="Sample every (0: at the end)")
                                sample_steps = gr.Number(
                                    defaults["style"]["sample_steps"], precision=0, label="Sample steps"
                                )
                            sample_prompts = gr.Textbox(
                                "\n".join(defaults["style"]["sample_prompts"]),
                                lines=3,
                                label="Sample prompts (one per line)",
                            )
                        with gr.Row():
                            start = gr.Button("Start training", variant="primary", elem_id="train-start")
                            cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                    with gr.Column(scale=1):
                        status = gr.Markdown("no job yet", elem_id="train-status")
                        plot = gr.LinePlot(
                            plot_frame(loss_points([])),
                            x="step",
                            y="loss",
                            title="Loss",
                            height=240,
                            elem_id="train-plot",
                        )
                        sample = gr.Image(
                            label="Latest samples", type="filepath", interactive=False, elem_id="train-sample"
                        )
                        log = gr.Textbox(label="Log", lines=6, max_lines=12, interactive=False)
                        command = gr.Code(label="Equivalent command", language="shell", elem_id="train-command")
                        config_text = gr.Code(label="Equivalent YAML (studio train-* --config FILE)", language="yaml")
                options = [
                    template,
                    trigger,
                    method,
                    rank,
                    alpha,
                    extra,
                    steps,
                    batch_size,
                    learning_rate,
                    lr_schedule,
                    seed,
                    checkpoint_every,
                    sample_every,
                    sample_prompts,
                    sample_steps,
                ]
                form = [kind, source, demo, name, *options]

                def on_kind(kind_value):
                    values = defaults[kind_value]
                    return (
                        gr.update(value=ui_cmd.default_demo_set(kind_value)),
                        values["steps"],
                        "\n".join(values["sample_prompts"]),
                    )

                kind.change(on_kind, kind, [demo, steps, sample_prompts])
                source.change(
                    lambda s: (gr.update(visible=s == "upload"), gr.update(visible=s == "demo set")),
                    source,
                    [files, demo],
                )
                method.change(lambda m: _defaults_text(m, ui_cmd.method_defaults(m)), method, method_help)
                gr.on([c.change for c in form], studio.preview_training, form, [command, config_text])
                app.load(studio.preview_training, form, [command, config_text])

                start.click(
                    *with_owner(studio.start_training, [kind, source, demo, files, name, *options]),
                    [job_id, status, command, config_text],
                    concurrency_limit=4,
                    api_name="start_training",
                )
                cancel.click(guarded(studio.cancel), job_id, status, api_name="cancel_training")

                def do_poll(current):
                    if not current:
                        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
                    text, points, image, tail = studio.poll(current)
                    return text, plot_frame(points), image, tail

                timer = gr.Timer(1.0)
                timer.tick(
                    guarded(do_poll),
                    job_id,
                    [status, plot, sample, log],
                    show_progress="hidden",
                    api_name="poll_training",
                )

            # ---------------------------------------------------------------- break-for-make
            with gr.Tab("Break-for-Make", id="b4m"):
                b4m_job = gr.State(None)
                gr.Markdown(
                    "Break trains a content PLP and a style PLP separately (with the shipped auxiliary sets as "
                    "partners), make pairs them into one joint adapter, compose generates with it. "
                    "Break-for-Make has no checkpoints: cancel stops it for good."
                )
                with gr.Row():
                    with gr.Column():
                        content_set = gr.Dropdown(
                            list(ui_cmd.demo_sets("content")), value="content-moon", label="Content set"
                        )
                        content_files = gr.File(
                            file_count="multiple", file_types=list(UPLOAD_SUFFIXES), label="...or upload content images"
                        )
                        style_set = gr.Dropdown(list(ui_cmd.demo_sets("style")), value="style-neon", label="Style set")
                        style_files = gr.File(
                            file_count="multiple", file_types=list(UPLOAD_SUFFIXES), label="...or upload style images"
                        )
                        b4m_name = gr.Textbox(label="Run name (optional)")
                        with gr.Row():
                            break_steps = gr.Number(b4m["break_steps"], precision=0, label="Break steps (each)")
                            make_steps = gr.Number(b4m["make_steps"], precision=0, label="Make steps")
                            b4m_rank = gr.Number(b4m["rank"], precision=0, label="PLP rank")
                            b4m_batch = gr.Number(b4m["batch_size"], precision=0, label="Batch size")
                        b4m_prompt = gr.Textbox(
                            label="Prompt of the final grid (optional)", placeholder="a moon in neon style"
                        )
                        with gr.Row():
                            b4m_start = gr.Button("Break → make", variant="primary")
                            b4m_cancel = gr.Button("Cancel", variant="stop")
                    with gr.Column():
                        b4m_status = gr.Markdown("no job yet")
                        b4m_plot = gr.LinePlot(
                            plot_frame(loss_points([])), x="step", y="loss", color="stage", title="Loss", height=240
                        )
                        b4m_sample = gr.Image(label="Composed", type="filepath", interactive=False)
                        b4m_command = gr.Code(label="Equivalent command", language="shell")
                with gr.Accordion("Compose with a finished Break-for-Make run", open=True):
                    with gr.Row():
                        compose_run = gr.Dropdown(studio.run_names((B4M_KIND,), "finished"), label="Run")
                        content_weight = gr.Slider(0, 2, 1.0, step=0.05, label="Content weight")
                        style_weight = gr.Slider(0, 2, 1.0, step=0.05, label="Style weight")
                    compose_prompt = gr.Textbox("a moon in neon style", label="Prompt(s), one per line")
                    compose_seed = gr.Number(0, precision=0, label="Seed")
                    compose_button = gr.Button("Compose")
                    compose_image = gr.Image(label="Composition", type="filepath", interactive=False)

                b4m_start.click(
                    *with_owner(
                        studio.start_b4m,
                        [
                            content_set,
                            style_set,
                            content_files,
                            style_files,
                            b4m_name,
                            break_steps,
                            make_steps,
                            b4m_rank,
                            b4m_batch,
                            b4m_prompt,
                        ],
                    ),
                    [b4m_job, b4m_status, b4m_command],
                    concurrency_limit=4,
                )
                b4m_cancel.click(guarded(studio.cancel), b4m_job, b4m_status)
                b4m_timer = gr.Timer(2.0)

                def do_b4m_poll(current):
                    if not current:
                        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
                    text, points, image, _ = studio.poll(current)
                    finished = studio.run_names((B4M_KIND,), "finished")
                    return text, plot_frame(points), image, gr.update(choices=finished)

                b4m_timer.tick(
                    guarded(do_b4m_poll),
                    b4m_job,
                    [b4m_status, b4m_plot, b4m_sample, compose_run],
                    show_progress="hidden",
                )

                def do_compose(run_name, content_w, style_w, prompt, seed_value, request: gr.Request):
                    out = studio.workspace.new_output(stem=f"compose-{run_name}")
                    studio.run_light(
                        studio.compose_argv(run_name, content_w, style_w, prompt, seed_value, out),
                        owner=owner_of(request),
                    )
                    return str(out)

                compose_button.click(
                    guarded(do_compose),
                    [compose_run, content_weight, style_weight, compose_prompt, compose_seed],
                    compose_image,
                    concurrency_limit=2,
                )

            # ---------------------------------------------------------------- generate
            with gr.Tab("Generate & compose", id="generate"):
                gr.Markdown(
                    "Base model: the embedded tiny SD. Pick up to three trained adapters with weights "
                    "(LoRA-style sum: base + Σ weight · adapter)."
                )
                slots = []
                trained = studio.run_names(TRAIN_KINDS, "finished")
                for index in range(ADAPTER_SLOTS):
                    with gr.Row():
                        slots.append(
                            (
                                gr.Dropdown(["(none)", *trained], value="(none)", label=f"Adapter {index + 1}"),
                                gr.Slider(-1, 2, 1.0, step=0.05, label="Weight"),
                            )
                        )
                gen_prompt = gr.Textbox("a star in neon style", lines=2, label="Prompt(s), one per line")
                with gr.Row():
                    gen_seed = gr.Number(0, precision=0, label="Seed")
                    gen_steps = gr.Number(20, precision=0, label="Denoising steps")
                    gen_guidance = gr.Number(5.0, label="Guidance")
                with gr.Row():
                    gen_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    refresh_adapters = gr.Button("Refresh adapter list")
                gallery = gr.Gallery(label="Generated", columns=3, height="auto", elem_id="generate-gallery")
                gen_command = gr.Code(label="Equivalent command", language="shell", elem_id="generate-command")
                gen_history = gr.State([])

                def do_generate(*values, owner: str):
                    *slot_values, prompt, seed_value, steps_value, guidance_value, history = values
                    adapters = [
                        (slot_values[2 * i], slot_values[2 * i + 1])
                        for i in range(ADAPTER_SLOTS)
                        if slot_values[2 * i] and slot_values[2 * i] != "(none)"
                    ]
                    out = studio.workspace.new_output(stem="generate")
                    argv = studio.generate_argv(adapters, prompt, seed_value, steps_value, guidance_value, out)
                    studio.run_light(argv, owner=owner)
                    history = [str(out), *(history or [])][:12]
                    return history, history, ui_cmd.command_line(argv)

                gen_button.click(
                    *with_owner(
                        do_generate,
                        [
                            *[c for slot in slots for c in slot],
                            gen_prompt,
                            gen_seed,
                            gen_steps,
                            gen_guidance,
                            gen_history,
                        ],
                    ),
                    [gallery, gen_history, gen_command],
                    concurrency_limit=2,
                )
                refresh_adapters.click(
                    lambda: [gr.update(choices=["(none)", *studio.run_names(TRAIN_KINDS, "finished")])] * ADAPTER_SLOTS,
                    None,
                    [slot[0] for slot in slots],
                )

            # ---------------------------------------------------------------- LLM
            with gr.Tab("LLM", id="llm"):
                llm_job = gr.State(None)
                task = ui_cmd.embedded_llm_task()
                gr.Markdown(
                    "Fine-tune the embedded tiny Llama with any method (`studio train-llm`), then talk to the "
                    "result. Other base models: the CLI's `--base` (the UI trains the embedded one only)."
                )
                with gr.Row():
                    with gr.Column(scale=1):
                        llm_source = gr.Radio([LLM_EMBEDDED, "upload"], value=LLM_EMBEDDED, label="Training data")
                        llm_task_note = gr.Markdown(
                            f"The held-out addition task shipped with the tiny LM (`{task['train'].name}`, never seen "
                            "in pretraining), evaluated before and after on its test set and on the knowledge probe "
                            "(how much pretraining knowledge survives)."
                        )
                        llm_train_file = gr.File(
                            file_types=[".jsonl"],
                            visible=False,
                            label="Training JSONL ({text}, {instruction, response} or {messages} per line)",
                        )
                        llm_eval_file = gr.File(
                            file_types=[".jsonl"],
                            visible=False,
                            label="Held-out JSONL (optional; rows with choices + answer give accuracy)",
                        )
                        llm_name = gr.Textbox(label="Run name (optional)", placeholder="llm-lora-task_add_train")
                        with gr.Accordion("Method", open=True):
                            with gr.Row():
                                llm_method = gr.Dropdown(
                                    ui_cmd.llm_methods(), value="lora", label="Method", elem_id="llm-method"
                                )
                                llm_rank = gr.Number(llm["rank"], precision=0, label="Rank r")
                                llm_alpha = gr.Number(llm["alpha"], label="Alpha")
                                llm_loram = gr.Number(0.0, label="LoRAM ratio (0: off; lora/paca)")
                            llm_extra = gr.Textbox(
                                lines=2, label="Other hyperparameters (KEY=VALUE per line)", placeholder="dropout=0.1"
                            )
                            llm_export = gr.Checkbox(False, label="Also export in PEFT format (--export-peft)")
                            llm_method_help = gr.Markdown(_llm_method_text("lora"))
                        with gr.Accordion("Training", open=True):
                            with gr.Row():
                                llm_steps = gr.Number(llm["steps"], precision=0, label="Steps")
                                llm_batch = gr.Number(llm["batch_size"], precision=0, label="Batch size")
                                llm_lr = gr.Number(llm["learning_rate"], label="Learning rate")
                            with gr.Row():
                                llm_schedule = gr.Dropdown(
                                    list(SCHEDULES), value=llm["lr_schedule"], label="LR schedule"
                                )
                                llm_warmup = gr.Number(llm["warmup_steps"], precision=0, label="Warm-up steps")
                                llm_max_length = gr.Number(llm["max_length"], precision=0, label="Max length (tokens)")
                            with gr.Row():
                                llm_seed = gr.Number(llm["seed"], precision=0, label="Seed")
                                llm_checkpoint = gr.Number(
                                    llm["checkpoint_every"], precision=0, label="Checkpoint every"
                                )
                        with gr.Row():
                            llm_start = gr.Button("Start training", variant="primary", elem_id="llm-start")
                            llm_cancel = gr.Button("Cancel", variant="stop", elem_id="llm-cancel")
                    with gr.Column(scale=1):
                        llm_status = gr.Markdown("no job yet", elem_id="llm-status")
                        llm_plot = gr.LinePlot(
                            plot_frame(loss_points([])), x="step", y="loss", title="Loss", height=240
                        )
                        llm_metrics = gr.Markdown(elem_id="llm-metrics")
                        llm_log = gr.Textbox(label="Log", lines=6, max_lines=12, interactive=False)
                        llm_command = gr.Code(label="Equivalent command", language="shell", elem_id="llm-command")
                        llm_yaml = gr.Code(label="Equivalent YAML (studio train-llm --config FILE)", language="yaml")
                with gr.Accordion("Chat with a finished run", open=True):
                    with gr.Row():
                        chat_run = gr.Dropdown(
                            [LLM_BASE_ONLY, *studio.run_names((LLM_KIND,), "finished")],
                            value=LLM_BASE_ONLY,
                            label="Run",
                            elem_id="llm-chat-run",
                            scale=3,
                            allow_custom_value=True,
                        )  # chat_argv checks the name server-side
                        chat_refresh = gr.Button("Refresh run list", scale=1)
                    chat_prompt = gr.Textbox(
                        "bexa has 8 cheese and buys 2 more . how many cheese does bexa have ?",
                        lines=2,
                        label="Prompt",
                        elem_id="llm-chat-prompt",
                    )
                    with gr.Row():
                        chat_template = gr.Checkbox(
                            True, label="Chat template (as training renders instructions); off: continue the raw text"
                        )
                        chat_tokens = gr.Number(32, precision=0, label="Max new tokens")
                        chat_temperature = gr.Number(0.0, label="Temperature (0: greedy)")
                    chat_send = gr.Button("Send", variant="primary", elem_id="llm-chat-send")
                    chat_reply = gr.Textbox(label="Reply", lines=3, interactive=False, elem_id="llm-chat-reply")
                    chat_command = gr.Code(label="Equivalent command", language="shell")

                llm_options = [
                    llm_method,
                    llm_rank,
                    llm_alpha,
                    llm_loram,
                    llm_extra,
                    llm_export,
                    llm_steps,
                    llm_batch,
                    llm_lr,
                    llm_schedule,
                    llm_warmup,
                    llm_max_length,
                    llm_seed,
                    llm_checkpoint,
                ]
                llm_form = [llm_source, llm_name, *llm_options]

                def on_llm_method(method_value):
                    values = ui_cmd.llm_defaults(method_value)
                    return (
                        gr.update(value=values["rank"], interactive=values["rank"] is not None),
                        gr.update(value=values["alpha"], interactive=values["alpha"] is not None),
                        _llm_method_text(method_value),
                    )

                llm_method.change(guarded(on_llm_method), llm_method, [llm_rank, llm_alpha, llm_method_help])
                llm_source.change(
                    lambda s: (
                        gr.update(visible=s == "upload"),
                        gr.update(visible=s == "upload"),
                        gr.update(visible=s == LLM_EMBEDDED),
                    ),
                    llm_source,
                    [llm_train_file, llm_eval_file, llm_task_note],
                )
                gr.on([c.change for c in llm_form], studio.preview_llm, llm_form, [llm_command, llm_yaml])
                app.load(studio.preview_llm, llm_form, [llm_command, llm_yaml])

                llm_start.click(
                    *with_owner(studio.start_llm, [llm_source, llm_train_file, llm_eval_file, llm_name, *llm_options]),
                    [llm_job, llm_status, llm_command, llm_yaml],
                    concurrency_limit=4,
                    api_name="start_llm",
                )
                llm_cancel.click(guarded(studio.cancel), llm_job, llm_status, api_name="cancel_llm")

                def do_llm_poll(current):
                    if not current:
                        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                    text, points, metrics, tail = studio.poll_llm(current)
                    finished = [LLM_BASE_ONLY, *studio.run_names((LLM_KIND,), "finished")]
                    return text, plot_frame(points), metrics, tail, gr.update(choices=finished)

                llm_timer = gr.Timer(1.0)
                llm_timer.tick(
                    guarded(do_llm_poll),
                    llm_job,
                    [llm_status, llm_plot, llm_metrics, llm_log, chat_run],
                    show_progress="hidden",
                    api_name="poll_llm",
                )
                chat_refresh.click(
                    lambda: gr.update(choices=[LLM_BASE_ONLY, *studio.run_names((LLM_KIND,), "finished")]),
                    None,
                    chat_run,
                    api_name="chat_runs",
                )
                chat_send.click(
                    *with_owner(studio.chat, [chat_run, chat_prompt, chat_template, chat_tokens, chat_temperature]),
                    [chat_reply, chat_command],
                    concurrency_limit=2,
                    api_name="chat",
                )

            # ---------------------------------------------------------------- analyze
            with gr.Tab("Analyze", id="analyze"):
                if ui_cmd.has_command("analyze"):
                    gr.Markdown(
                        "The LoRA computational-limits report: which attention heads are in the low-rank "
                        "regime, on the embedded base with or without a trained adapter (docs/analysis.md)."
                    )
                    with gr.Row():
                        analyze_model = gr.Radio(
                            ["embedded-sd", "embedded-lm"], value="embedded-sd", label="Base model"
                        )
                        analyze_run = gr.Dropdown(
                            ["(none)", *studio.run_names(status="finished")],
                            value="(none)",
                            label="Adapter (a finished run)",
                        )
                        analyze_batches = gr.Number(2, precision=0, label="Batches")
                        analyze_steps = gr.Number(4, precision=0, label="Denoising steps (SD)")
                    analyze_button = gr.Button("Analyze", variant="primary", elem_id="analyze-button")
                    heatmap = gr.Image(label="Heatmap", type="filepath", interactive=False, elem_id="analyze-heatmap")
                    report_file = gr.File(label="report.json", interactive=False)
                    report_table = gr.Textbox(label="Per-head table", lines=12, interactive=False)

                    def do_analyze(model, run_name, batches, steps_value, request: gr.Request):
                        return studio.analyze(model, run_name, batches, steps_value, owner=owner_of(request))

                    analyze_button.click(
                        guarded(do_analyze),
                        [analyze_model, analyze_run, analyze_batches, analyze_steps],
                        [heatmap, report_table, report_file],
                        concurrency_limit=2,
                    )
                else:
                    gr.Markdown(
                        "**Not available yet**: the LoRA-limits analysis (`studio analyze`) is not "
                        "in this studio so far."
                    )

            # ---------------------------------------------------------------- runs
            with gr.Tab("Runs", id="runs") as runs_tab:
                runs_job = gr.State(None)
                with gr.Row():
                    refresh = gr.Button("Refresh", elem_id="runs-refresh")
                table = gr.Dataframe(
                    studio.runs_table(),
                    headers=["name", "kind", "status", "step", "loss", "updated"],
                    interactive=False,
                    elem_id="runs-table",
                    wrap=True,
                )
                with gr.Row():
                    selected = gr.Dropdown(studio.run_names(), label="Run", elem_id="runs-select")
                    resume_button = gr.Button("Resume")
                    export_format = gr.Radio(["diffusers", "peft"], value="diffusers", label="Export format")
                    export_button = gr.Button("Export")
                summary = gr.Markdown(elem_id="runs-summary")
                samples = gr.Gallery(label="Samples", columns=4, height="auto")
                exported = gr.File(label="Exported adapter (zip)", interactive=False)
                run_config = gr.Code(label="config.yaml", language="yaml")
                with gr.Row():
                    confirm = gr.Checkbox(label="Yes, delete this run folder for good")
                    delete_button = gr.Button("Delete run", variant="stop")
                runs_message = gr.Markdown()

                def refresh_runs():
                    return studio.runs_table(), gr.update(choices=studio.run_names())

                refresh.click(refresh_runs, None, [table, selected])
                runs_tab.select(refresh_runs, None, [table, selected])
                selected.change(
                    guarded(lambda n: studio.run_details(n) if n else ("", [], "")),
                    selected,
                    [summary, samples, run_config],
                )

                def do_resume(run_name, request: gr.Request):
                    new_id = studio.resume(run_name, owner=owner_of(request))
                    return new_id, f"resuming **{run_name}** (job {new_id}); follow it here or refresh"

                resume_button.click(guarded(do_resume), selected, [runs_job, runs_message])

                def do_export(run_name, fmt, request: gr.Request):
                    return studio.export(run_name, fmt, owner=owner_of(request))

                export_button.click(guarded(do_export), [selected, export_format], exported, concurrency_limit=2)

                def do_delete(run_name, confirmed):
                    message = studio.delete(run_name, confirmed)
                    return message, studio.runs_table(), gr.update(choices=studio.run_names(), value=None), False

                delete_button.click(guarded(do_delete), [selected, confirm], [runs_message, table, selected, confirm])

                def do_runs_poll(current):
                    if not current:
                        return gr.skip()
                    text, *_ = studio.poll(current)
                    return text

                runs_timer = gr.Timer(2.0)
                runs_timer.tick(guarded(do_runs_poll), runs_job, runs_message, show_progress="hidden")
    return app


def _llm_method_text(method: str) -> str:
    values = ui_cmd.llm_defaults(method)
    shown = ", ".join(f"`{k}={v!r}`" for k, v in values["hyperparameters"].items())
    notes = {
        "corda": " CorDA first runs its covariance step on the first training rows (`--calibration-examples`).",
        "spt": " SPT first measures gradient sensitivities on the first training rows.",
        "compacter": " Compacter has no rank/alpha here: size it with `n=`, `reduction_factor=`.",
    }
    return f"**{method}** in train-llm: {shown}.{notes.get(method, '')} LoRAM (ratio > 0) works with lora and paca."


def _defaults_text(method: str, values: dict[str, Any]) -> str:
    shown = ", ".join(f"`{k}={v!r}`" for k, v in values.items())
    return f"**{method}** defaults: {shown}. Rank and alpha map to `r` and `alpha` where the method has them."


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
