"""`studio train-llm`: fine-tune a causal LM with any peft_core method on JSONL data.

With no arguments it is the embedded demo: LoRA on the shipped tiny Llama, trained on its held-out
addition task (never seen in pretraining), with the task's test accuracy and the knowledge probe
printed before and after, in about a minute on a CPU.

    studio train-llm                                            # the demo
    studio train-llm data.jsonl --eval test.jsonl --base meta-llama/Llama-3.2-1B --method paca --rank 16
    studio train-llm --method lora --loram-ratio 0.5            # LoRAM: prune, train small, recover
    studio train-llm --method corda --set mode=kpm --calibration-data facts.jsonl
    accelerate launch --num_processes 2 -m studio.cli train-llm ...   # DDP, same code
    studio train-llm --resume runs/llm-task_add_train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.errors import UserError
from studio.llm import LlmJob, LlmTrainConfig, job_from_record, job_record, method_defaults
from studio.options import (
    add_dataclass_arguments,
    add_method_arguments,
    dataclass_from_flags,
    load_yaml,
    method_config,
)

TRAIN_HELP = {
    "steps": "optimizer steps",
    "batch_size": "sequences per micro-step, per process",
    "learning_rate": "AdamW learning rate",
    "lr_schedule": "constant, cosine or linear decay after warm-up",
    "warmup_steps": "linear warm-up steps",
    "gradient_accumulation": "micro-steps per optimizer step",
    "mixed_precision": "no, fp16 or bf16 (accelerate autocast)",
    "base_dtype": "dtype of the frozen base weights: float32, bfloat16 or float16",
    "load_in_4bit": "NF4 base through bitsandbytes (QLoRA / QPaCA; CUDA only)",
    "gradient_checkpointing": "trade compute for activation memory",
    "loss_chunk_tokens": "compute the output layer and loss N tokens at a time, recomputed in backward: "
    "saves the (tokens x vocab) logits memory (0: off; one process only)",
    "optimizer": "adamw, or adamw8bit (bitsandbytes, CUDA only)",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "seed": "seed of every random draw (same seed, same run)",
    "max_length": "longest sequence in tokens; longer rows are truncated (and counted)",
    "packing": "concatenate rows into max_length blocks instead of padding each batch",
    "skip_bad_lines": "train without malformed JSONL lines instead of stopping",
    "checkpoint_every": "write a resumable checkpoint every N steps",
    "eval_every": "evaluate every N steps (0: before and after training only)",
    "eval_batch_size": "sequences per evaluation forward",
    "calibration_examples": "CorDA / SPT: calibrate on the first N training (or --calibration-data) rows",
    "loram_ratio": "LoRAM pruning ratio (0: off): prune, train the small model, recover to the full one",
    "loram_strategy": "LoRAM pruning: random, norm (structured), semi (2:4) or unstructured",
    "loram_keep_first": "LoRAM: leading decoder layers kept whole (-1: min(4, layers // 4))",
    "loram_keep_last": "LoRAM: trailing decoder layers kept whole (-1: min(2, layers // 4))",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data",
        nargs="?",
        default=None,
        help="training JSONL ({text}, {instruction, response} or {messages}); default: the embedded "
        "tiny LM's held-out addition task",
    )
    parser.add_argument(
        "--eval",
        nargs="*",
        default=None,
        metavar="JSONL",
        help="held-out JSONL files: loss/perplexity, and accuracy on rows with choices + answer",
    )
    parser.add_argument("--base", default=None, help="causal LM: 'embedded' (default), a hub id or a local folder")
    parser.add_argument(
        "--calibration-data",
        default=None,
        metavar="JSONL",
        help="CorDA / SPT calibration rows (default: the training data)",
    )
    parser.add_argument("--save-merged", action="store_true", help="also write the model with the adapter merged in")
    parser.add_argument("--export-peft", action="store_true", help="also export the adapter in HF PEFT format")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    parser.add_argument("--config", default=None, help="YAML file with any of these options (flags win over it)")
    parser.add_argument("--name", default=None, help="run name (default: llm-<method>-<data file name>)")
    parser.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs)")
    parser.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint"
    )
    add_method_arguments(parser, default_method="lora")
    add_dataclass_arguments(parser.add_argument_group("training"), LlmTrainConfig, TRAIN_HELP)


def resolve(args: argparse.Namespace) -> LlmJob:
    """The job from YAML < flags, validated before anything is written or loaded."""
    values = load_yaml(args.config)
    train = dataclass_from_flags(LlmTrainConfig, values.pop("train", {}), args, "the training options")
    train.check()
    adapter_values = dict(values.pop("adapter", {}))
    method = getattr(args, "method", adapter_values.get("method", "lora"))
    targets, defaults = method_defaults(method)
    adapter = method_config(args, adapter_values, "lora", targets, defaults=defaults)
    pick = lambda flag, key: flag if flag is not None else values.pop(key, None)  # noqa: E731
    data, eval_data = pick(args.data, "data"), pick(args.eval, "eval_data")
    calibration = pick(args.calibration_data, "calibration_data")
    base = pick(args.base, "base") or "embedded"
    flags = {key: getattr(args, key) or bool(values.pop(key, False)) for key in ("save_merged", "export_peft", "cpu")}
    for key in ("name", "runs_dir"):
        values.pop(key, None)
    if values:
        raise UserError(f"unknown option(s) in {args.config}: {', '.join(sorted(values))}")
    if data is None and eval_data is None:
        eval_data = None  # the embedded demo picks its own test set and knowledge probe
    return LlmJob(
        adapter=adapter,
        train=train,
        data=None if data is None else Path(data),
        eval_data=[Path(p) for p in (eval_data or [])],
        calibration_data=None if calibration is None else Path(calibration),
        base=base,
        **flags,
    )


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "when")


def run(args: argparse.Namespace) -> int:
    from accelerate.utils import broadcast_object_list

    from pipelines.train import make_accelerator
    from studio.llm import check_method_on_model, train_llm
    from studio.progress import ProgressPrinter
    from studio.runs import Run

    # 1. Resolve and validate everything before writing anything (a resumed run uses its own config).
    if args.resume:
        run_folder = Run.open(args.resume)
        job = job_from_record(run_folder.config)
    else:
        job = resolve(args)
    check_method_on_model(job)  # a method/model mismatch fails before a run folder or any weight exists
    accelerator = make_accelerator(job.train.mixed_precision, cpu=job.cpu)
    main = accelerator.is_main_process

    # 2. The run folder (made by the main process; the others learn its path).
    if not args.resume:
        path = [None]
        if main:
            data_name = job.data.stem if job.data else "task_add_train"
            name = args.name or f"llm-{job.adapter.method}{'-loram' if job.train.loram_ratio else ''}-{data_name}"
            path = [str(Run.create(args.runs_dir, name, kind="train-llm", config=job_record(job)).directory)]
        if accelerator.num_processes > 1:
            broadcast_object_list(path)
        run_folder = Run(Path(path[0]))
    if main:
        processes = (
            f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}, {accelerator.device}"
        )
        print(f"run folder: {run_folder.directory} ({processes})", flush=True)

    # 3. Train (events go to the run folder and the progress bar).
    progress = ProgressPrinter(job.train.steps) if main else None

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

    try:
        result = train_llm(job, run_folder.directory, on_event=on_event, accelerator=accelerator)
    except KeyboardInterrupt:
        if main:
            run_folder.update(status="interrupted")
            print(f"\ninterrupted; resume with: studio train-llm --resume {run_folder.directory}", file=sys.stderr)
        return 130
    except BaseException as error:
        if main:
            run_folder.update(status="failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        if progress:
            progress.close()
    if not main:
        return 0
    run_folder.update(
        status="finished",
        before=result.before,
        after=result.after,
        trainable_params=result.trainable_params,
        wall_s=result.wall_s,
        peak_gib=result.peak_gib,
    )
    for key in sorted(result.after):
        if key.endswith("/accuracy") or key.endswith("/perplexity"):
            print(f"{key}: {result.before.get(key, float('nan')):.4f} before -> {result.after[key]:.4f} after")
    print(f"trainable parameters: {result.trainable_params:,}; wall time {result.wall_s:.1f} s")
    print(f"adapter: {result.adapter_dir}")
    for label, folder in (("merged model", result.merged_dir), ("PEFT export", result.peft_dir)):
        if folder:
            print(f"{label}: {folder}")
    return 0
