"""`studio train-llm`: fine-tune a causal LM with any peft_core method on your data (JSONL, JSON, CSV, Parquet).

With no arguments it is the embedded demo: LoRA on the shipped tiny Llama, trained on its held-out
addition task (never seen in pretraining), with the task's test accuracy and the knowledge probe
printed before and after, in about a minute on a CPU.

    studio train-llm                                            # the demo
    studio train-llm data.jsonl --eval test.jsonl --base meta-llama/Llama-3.2-1B --method paca --rank 16
    studio train-llm chats.parquet --format sharegpt --packing --max-length 1024   # formats: docs/llm.md
    studio train-llm pairs.jsonl --objective dpo --dpo-beta 0.1   # preference tuning (or orpo); no data: the demo's
    studio data check data.jsonl --max-length 512          # rows, format, token lengths, the loss mask
    studio train-llm --method lora --loram-ratio 0.5            # LoRAM: prune, train small, recover
    studio train-llm --method corda --set mode=kpm --calibration-data facts.jsonl
    accelerate launch --num_processes 2 -m studio.cli train-llm ...   # DDP, same code
    studio train-llm --resume runs/llm-task_add_train
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipelines.options import option
from studio.adapters import adapter_config, adapter_section
from studio.llm import LlmJob, LlmTrainConfig, job_from_record, job_record
from studio.options import Section, resume_flags
from studio.preflight import run_record, writable_folder


@dataclass
class LlmRunOptions:
    """The data, the base model, the outputs and where the run goes (top-level keys of the YAML)."""

    data: str | None = option(
        None,
        help="training data: a JSONL, JSON, CSV or Parquet file (messages, sharegpt, alpaca, prompt-completion "
        "or text rows; preference rows for --objective dpo/orpo; see --format) or a hub dataset id; default: the "
        "embedded tiny LM's held-out addition task (as preference pairs for dpo/orpo)",
        positional=True,
        ui=False,
    )
    eval: list[str] | None = option(
        None,
        help="held-out data files (format detected per file): loss/perplexity, and accuracy on rows with "
        "choices + answer",
        metavar="FILE",
        ui=False,
    )
    base: str = option("embedded", help="causal LM: 'embedded', a hub id or a local folder", ui=False)
    calibration_data: str | None = option(
        None, help="CorDA / SPT calibration rows (default: the training data)", metavar="FILE", ui=False
    )
    save_merged: bool = option(False, help="also write the model with the adapter merged in")
    export_peft: bool = option(False, help="also export the adapter in HF PEFT format")
    cpu: bool = option(False, help="train on the CPU even if a GPU is present", ui=False)
    name: str | None = option(None, help="run name (default: llm-<method>-<data file name>)", ui=False)
    runs_dir: str = option("runs", help="where run folders go", ui=False)
    resume: str | None = option(
        None, help="continue an interrupted run from its last checkpoint", metavar="RUN_DIR", ui=False
    )


def sections() -> list[Section]:
    return [Section(None, LlmRunOptions), adapter_section("llm"), Section("train", LlmTrainConfig, title="training")]


def resolve(args: argparse.Namespace) -> LlmJob:
    """The job from YAML < flags, validated before anything is written or loaded."""
    run, adapter = args.options[None], args.options["adapter"]
    train = args.options["train"]
    train.check()
    return LlmJob(
        adapter=adapter_config(adapter, "llm", ["all-linear"]),
        train=train,
        data=None if run.data is None else Path(run.data),
        eval_data=[Path(p) for p in (run.eval or [])],
        calibration_data=None if run.calibration_data is None else Path(run.calibration_data),
        base=run.base,
        save_merged=run.save_merged,
        export_peft=run.export_peft,
        cpu=run.cpu,
    )


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "when")


def run(args: argparse.Namespace) -> int:
    from pipelines.training import make_accelerator
    from studio.llm import check_method_on_model, read_inputs, train_llm
    from studio.progress import ProgressPrinter
    from studio.runs import Run, safe_run_name

    # 1. Resolve and validate everything before writing anything (a resumed run uses its own config).
    if args.resume:
        run_folder = Run.open(args.resume)
        job = run_record(run_folder, "train-llm", job_from_record)
        changes = apply_resume_flags(args, run_folder, job)
    else:
        job = resolve(args)
        writable_folder(args.runs_dir, "--runs-dir")
        safe_run_name(_run_name(args, job))
    check_method_on_model(job)  # a method/model mismatch fails before a run folder or any weight exists
    inputs = read_inputs(job)  # every data problem (a missing file, a bad line, not UTF-8): no run folder yet
    accelerator = make_accelerator(job.train.mixed_precision, cpu=job.cpu)
    main = accelerator.is_main_process
    if args.resume and main:
        run_folder.acquire()  # one writer at a time: a second one is refused here, before anything loads
        run_folder.update_config(changes)

    # 2. The run folder (made by the main process; the others learn its path).
    if not args.resume:
        run_folder = _create_run_folder(args, job, accelerator)
    if main:
        processes = (
            f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}, {accelerator.device}"
        )
        print(f"run folder: {run_folder.directory} ({processes})", flush=True)

    # 3. Train (events go to the run folder and the progress bar).
    progress = ProgressPrinter(job.train.steps) if main else None
    on_event = _event_logger(run_folder, progress)
    with run_folder.lifecycle(f"studio train-llm --resume {run_folder.directory}", main_process=main) as outcome:
        try:
            result = train_llm(job, run_folder.directory, on_event=on_event, accelerator=accelerator, inputs=inputs)
        finally:
            if progress:
                progress.close()
    if outcome.interrupted or not main:
        return outcome.exit_code
    run_folder.update(
        status="finished",
        before=result.before,
        after=result.after,
        trainable_params=result.trainable_params,
        wall_s=result.wall_s,
        peak_gib=result.peak_gib,
    )
    _print_result(result)
    return 0


# What --resume may change (kept in config.yaml); any other flag is refused by name.
RESUME_FLAGS = {"train": ("steps", "checkpoint_every", "eval_every"), None: ("cpu",)}


def apply_resume_flags(args: argparse.Namespace, run_folder, job: LlmJob) -> dict:
    """The flags given with --resume: --steps (train longer, or stop sooner; the LR schedule follows the
    new total), --checkpoint-every, --eval-every and --cpu apply; any other is a UserError naming it.
    Returns the changes for config.yaml."""
    changes = resume_flags(args, sections(), RESUME_FLAGS)
    train = changes.get("train", {})
    if "steps" in train:
        run_folder.check_resume_steps(train["steps"])
    job.train = dataclasses.replace(job.train, **train)
    job.cpu = changes.get(None, {}).get("cpu", job.cpu)
    return changes


def _create_run_folder(args: argparse.Namespace, job: LlmJob, accelerator):
    """A new run folder, made by the main process; every process gets its path."""
    from studio.runs import Run

    return Run.create_shared(args.runs_dir, _run_name(args, job), "train-llm", job_record(job), accelerator)


def _run_name(args: argparse.Namespace, job: LlmJob) -> str:
    """--name, else llm-<method>[-loram][-dpo|-orpo]-<data file name>."""
    preference = job.train.objective != "sft"
    data_name = job.data.stem if job.data else ("preference_add_train" if preference else "task_add_train")
    loram = "-loram" if job.train.loram_ratio else ""
    objective = f"-{job.train.objective}" if preference else ""
    return args.name or f"llm-{job.adapter.method}{loram}{objective}-{data_name}"


def _event_logger(run_folder, progress):
    """Every event into the run folder; eval metrics and the data summary as lines, the rest on the bar."""

    def on_event(event) -> None:
        run_folder.log_event(event)
        if event.kind == "eval":
            progress.bar.write(
                f"eval ({event.metrics.get('when', f'step {event.step}')}): {_format_metrics(event.metrics)}"
            )
        elif event.kind == "data":
            progress.bar.write(event.message)
        else:
            progress(event)

    return on_event


def _print_result(result) -> None:
    """Before/after metrics, size, time and where the outputs are."""
    for key in sorted(result.after):
        if key.endswith(("/accuracy", "/preference_accuracy", "/perplexity")):
            print(f"{key}: {result.before.get(key, float('nan')):.4f} before -> {result.after[key]:.4f} after")
    print(f"trainable parameters: {result.trainable_params:,}; wall time {result.wall_s:.1f} s")
    print(f"adapter: {result.adapter_dir}")
    for label, folder in (("merged model", result.merged_dir), ("PEFT export", result.peft_dir)):
        if folder:
            print(f"{label}: {folder}")
