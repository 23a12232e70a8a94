"""What an LLM run is: the data, the model, the method (`LlmJob`) and how to train (`LlmTrainConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peft_core import AdapterConfig
from pipelines.errors import UserError
from pipelines.options import build, check_fields, option
from pipelines.training import LR_SCHEDULES, MIXED_PRECISIONS, OPTIMIZERS
from studio.llm.data import DATA_FORMATS

OBJECTIVES = ("sft", "dpo", "orpo")


@dataclass
class LlmTrainConfig:
    """How to train (what to train is the adapter config).

    Defaults: the embedded demo (about a minute on 2 CPU cores)."""

    objective: str = option(
        "sft",
        help="sft: the next-token loss on the responses; dpo / orpo: preference tuning on prompt / chosen / "
        "rejected rows (DPO against the base without the adapter; ORPO with no reference)",
        choices=OBJECTIVES,
    )
    dpo_beta: float = option(
        0.1,
        help="DPO: beta, how strongly the log-ratio to the reference is scaled (higher: stay closer)",
        above=0,
        advanced=True,
    )
    orpo_lambda: float = option(
        0.1,
        help="ORPO: lambda, the weight of the odds-ratio term next to the chosen response's NLL",
        min=0,
        advanced=True,
    )
    steps: int = option(300, help="optimizer steps", min=1)
    batch_size: int = option(16, help="sequences (dpo / orpo: pairs) per micro-step, per process", min=1)
    learning_rate: float = option(3e-3, help="AdamW learning rate", above=0)
    lr_schedule: str = option("cosine", help="learning-rate schedule after warm-up", choices=LR_SCHEDULES)
    warmup_steps: int = option(10, help="linear warm-up steps", min=0)
    gradient_accumulation: int = option(1, help="micro-steps per optimizer step", min=1, advanced=True)
    mixed_precision: str = option(
        "no", help="autocast dtype (accelerate autocast)", choices=MIXED_PRECISIONS, advanced=True
    )
    base_dtype: str = option(
        "float32", help="dtype of the frozen base weights", choices=("float32", "bfloat16", "float16"), advanced=True
    )
    load_in_4bit: bool = option(False, help="NF4 base through bitsandbytes (QLoRA / QPaCA; CUDA only)", advanced=True)
    gradient_checkpointing: bool = option(False, help="trade compute for activation memory", advanced=True)
    loss_chunk_tokens: int = option(
        0,
        help="compute the output layer and loss N tokens at a time, recomputed in backward: saves the "
        "(tokens x vocab) logits memory (0: off; one process only)",
        min=0,
        advanced=True,
    )
    optimizer: str = option(
        "adamw", help="adamw, or adamw8bit (bitsandbytes, CUDA only)", choices=OPTIMIZERS, advanced=True
    )
    weight_decay: float = option(0.0, help="AdamW weight decay", min=0, advanced=True)
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0: off)", min=0, advanced=True)
    seed: int = option(0, help="seed of every random draw (same seed, same run)", min=0, max=2**32 - 1)
    max_length: int = option(
        256, help="longest sequence in tokens; longer rows are truncated (and counted)", min=1, unit="tokens"
    )
    packing: bool = option(
        False,
        help="concatenate rows into max_length blocks instead of padding each batch (positions restart and "
        "attention stays within each row)",
        advanced=True,
    )
    format: str = option(
        "auto",
        help="format of the training and calibration data (auto: detected per file from its rows' fields)",
        choices=DATA_FORMATS,
        advanced=True,
    )
    skip_bad_lines: bool = option(False, help="train without malformed data rows instead of stopping", advanced=True)
    checkpoint_every: int = option(100, help="write a resumable checkpoint every N steps", min=1)
    eval_every: int = option(0, help="evaluate every N steps (0: before and after training only)", min=0, advanced=True)
    eval_batch_size: int = option(64, help="sequences per evaluation forward", min=1, advanced=True)
    calibration_examples: int = option(
        64, help="CorDA / SPT: calibrate on the first N training (or --calibration-data) rows", min=1, advanced=True
    )
    loram_ratio: float = option(
        0.0, help="LoRAM pruning ratio (0: off): prune, train the small model, recover to the full one", min=0
    )
    loram_strategy: str = option(
        "random",
        help="LoRAM pruning: random, norm (structured), semi (2:4) or unstructured",
        choices=("random", "norm", "semi", "unstructured"),
        advanced=True,
    )
    loram_keep_first: int = option(
        -1, help="LoRAM: leading decoder layers kept whole (-1: min(4, layers // 4))", min=-1, advanced=True
    )
    loram_keep_last: int = option(
        -1, help="LoRAM: trailing decoder layers kept whole (-1: min(2, layers // 4))", min=-1, advanced=True
    )

    def check(self) -> None:
        check_fields(self)
        if not self.loram_ratio < 1:
            raise UserError(f"loram_ratio must be in [0, 1) (0: no LoRAM), got {self.loram_ratio}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LlmJob:
    """Everything one run needs: the data, the model, the method and how to train."""

    adapter: AdapterConfig
    train: LlmTrainConfig = field(default_factory=LlmTrainConfig)
    data: Path | None = None  # None: the embedded LM's downstream task
    eval_data: list[Path] = field(default_factory=list)
    calibration_data: Path | None = None  # CorDA / SPT calibration rows (default: the training data)
    base: str = "embedded"
    save_merged: bool = False
    export_peft: bool = False
    cpu: bool = False  # force the CPU even when a GPU is present


def job_record(job: LlmJob) -> dict[str, Any]:
    """The run's resolved config (config.yaml): enough to rerun or resume it."""
    return {
        "data": None if job.data is None else str(job.data),
        "eval_data": [str(p) for p in job.eval_data],
        "calibration_data": None if job.calibration_data is None else str(job.calibration_data),
        "base": job.base,
        "save_merged": job.save_merged,
        "export_peft": job.export_peft,
        "cpu": job.cpu,
        "adapter": job.adapter.to_dict(),
        "train": dataclasses.asdict(job.train),
    }


def job_from_record(record: dict[str, Any]) -> LlmJob:
    from peft_core import config_from_dict

    optional = lambda key: None if record.get(key) is None else Path(record[key])  # noqa: E731
    return LlmJob(
        adapter=config_from_dict(record["adapter"]),
        train=build(LlmTrainConfig, dict(record["train"]), "the run's config"),
        data=optional("data"),
        eval_data=[Path(p) for p in record.get("eval_data", [])],
        calibration_data=optional("calibration_data"),
        base=record["base"],
        save_merged=record.get("save_merged", False),
        export_peft=record.get("export_peft", False),
        cpu=record.get("cpu", False),
    )
