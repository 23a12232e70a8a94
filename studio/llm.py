"""The LLM trainer: any peft_core method on any Hugging Face causal LM, read top to bottom.

    job = LlmJob(data=Path("train.jsonl"), eval_data=[Path("test.jsonl")], base="embedded",
                 adapter=LoraConfig(targets=["all-linear"], r=8, alpha=16), train=LlmTrainConfig(steps=200))
    result = train_llm(job, "runs/my-run", on_event=print)

`train_llm` is the algorithm, in five steps:
1. check   - the config, the data (every malformed JSONL line, by number) and the method against the
             model's architecture, built on the meta device: nothing is loaded before they pass;
2. set up  - accelerate, the base model (optionally NF4), LoRAM's prune, the method's prepare step
             (CorDA covariances, SPT sensitivities) on the first training examples, optimizer, schedule;
3. fit     - the causal-LM loss on response tokens, normalised by the global step's token count, so
             one process and N processes with the same global batch follow the same curve;
4. evaluate- loss / perplexity and multiple-choice accuracy on held-out JSONL, before and after;
5. save    - the adapter (peft_core format; LoRAM: recovered to the full model's shapes), optionally
             a merged model and a PEFT-format export.

Data rows (JSONL, one object a line): {"text"}, {"instruction", "response"} (optional "input") or
{"messages": [{"role", "content"}, ...]} rendered with the tokenizer's chat template; the loss
covers the response / assistant tokens only (everything for "text"). Evaluation rows may instead
be multiple-choice items {"prompt" or "instruction", "choices", "answer" (index)}.

Exact resume: which examples step s uses comes from (seed, s) alone, and checkpoints restore the
adapter, optimizer, scheduler and RNG (pipelines.checkpoint), so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from peft_core import AdapterConfig, AdapterError, attach, get_method
from peft_core import load as load_adapter
from pipelines.errors import UserError

IGNORE = -100  # label of tokens that carry no loss (prompts, padding)
# Used when a tokenizer has no chat template of its own (base models usually have none).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}### response:\n{{ message['content'] }}"
    "{{ eos_token }}\n{% else %}### {{ message['role'] }}:\n{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### response:\n{% endif %}"
)
# Methods whose adapter LoRAM can recover from a pruned model, and methods that can sit on an NF4 base.
LORAM_METHODS = ("lora", "paca")
NF4_METHODS = ("lora", "paca", "compacter")
MERGEABLE = ("lora", "paca", "plp", "corda", "spt")
# Config fields of models whose logits are not just lm_head(last hidden state) (Gemma 2, Cohere, ...).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


@dataclass
class LlmTrainConfig:
    """How to train (what to train is the adapter config).

    Defaults: the embedded demo (about a minute on 2 CPU cores)."""

    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    lr_schedule: str = "cosine"  # "constant" | "cosine" | "linear" (after warm-up)
    warmup_steps: int = 10
    gradient_accumulation: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (accelerate autocast)
    base_dtype: str = "float32"  # dtype of the frozen base weights: float32 | bfloat16 | float16
    load_in_4bit: bool = False  # NF4 base through bitsandbytes (QLoRA / QPaCA; CUDA)
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = 0  # > 0: output layer + cross-entropy this many tokens at a time (one process)
    optimizer: str = "adamw"  # "adamw" | "adamw8bit" (bitsandbytes, CUDA)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    max_length: int = 256
    packing: bool = False
    skip_bad_lines: bool = False
    checkpoint_every: int = 100
    eval_every: int = 0  # 0: evaluate before and after training only
    eval_batch_size: int = 64
    calibration_examples: int = 64  # CorDA / SPT: the first N training examples
    loram_ratio: float = 0.0  # > 0: LoRAM (prune -> train the small model -> recover), lora or paca
    loram_strategy: str = "random"  # random | norm | semi | unstructured
    loram_keep_first: int = -1  # decoder layers kept whole at each end; -1: min(4, L // 4) and min(2, L // 4)
    loram_keep_last: int = -1

    def check(self) -> None:
        choices = {
            "lr_schedule": ("constant", "cosine", "linear"),
            "mixed_precision": ("no", "fp16", "bf16"),
            "optimizer": ("adamw", "adamw8bit"),
            "base_dtype": tuple(DTYPES),
            "loram_strategy": ("random", "norm", "semi", "unstructured"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in (
            "steps",
            "batch_size",
            "gradient_accumulation",
            "max_length",
            "eval_batch_size",
            "calibration_examples",
        ):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.loram_ratio < 1:
            raise UserError(f"loram_ratio must be in [0, 1) (0: no LoRAM), got {self.loram_ratio}")
        if self.loss_chunk_tokens < 0:
            raise UserError(f"loss_chunk_tokens must be >= 0 (0: off), got {self.loss_chunk_tokens}")
        if self.checkpoint_every < 1:
            raise UserError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")


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


@dataclass
class LlmEvent:
    """One progress event (the CLI's bar, events.jsonl and the UI read these)."""

    kind: str  # "data" | "eval" | "step" | "checkpoint" | "done"
    step: int
    total_steps: int
    loss: float | None = None
    lr: float | None = None
    eta_s: float | None = None
    path: str | None = None
    metrics: dict[str, Any] | None = None
    message: str | None = None


# =============================================================================================
# Data: JSONL rows -> token ids with labels.
# =============================================================================================
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss

    @property
    def label_count(self) -> int:  # tokens predicted after the causal shift
        return sum(label != IGNORE for label in self.labels[1:])


@dataclass
class TokenizedData:
    examples: list[Example]
    rows: int
    truncated: int = 0
    dropped: int = 0  # no response token left after truncation

    def summary(self, path: Path | str, max_length: int) -> str:
        text = f"{path}: {self.rows} rows -> {len(self.examples)} training sequences"
        if self.truncated:
            text += f"; {self.truncated} longer than max_length {max_length} were truncated"
        if self.dropped:
            text += f"; {self.dropped} dropped (no response token left after truncation)"
        return text


def _row_problem(row: Any, for_training: bool) -> str | None:
    """Why `row` is not a usable data row (None if it is)."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "text" in row:
        return None if isinstance(row["text"], str) and row["text"] else '"text" must be a non-empty string'
    if "messages" in row:
        messages = row["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            return '"messages" must be a non-empty list of {"role": str, "content": str}'
        if not any(m["role"] == "assistant" for m in messages) and (for_training or "choices" not in row):
            return '"messages" has no "assistant" message to learn'
        return _choice_problem(row) if "choices" in row else None
    if "instruction" in row:
        if not isinstance(row["instruction"], str) or not isinstance(row.get("input", ""), str):
            return '"instruction" (and "input") must be strings'
        if "response" in row:
            return None if isinstance(row["response"], str) else '"response" must be a string'
        if not for_training and "choices" in row:
            return _choice_problem(row)
        return 'an "instruction" row needs a "response"'
    if "prompt" in row and not for_training:
        return _choice_problem(row) if isinstance(row["prompt"], str) else '"prompt" must be a string'
    keys = ", ".join(sorted(row)) or "none"
    expected = '"text", "instruction" + "response" or "messages"' + (
        "" if for_training else ', or "prompt" + "choices" + "answer"'
    )
    return f"no known fields (has {keys}; expected {expected})"


def _choice_problem(row: dict) -> str | None:
    choices, answer = row.get("choices"), row.get("answer")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        return '"choices" must be a list of at least two strings'
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return f'"answer" must be the index of the right choice (0..{len(choices) - 1})'
    return None


def read_jsonl(path: str | os.PathLike, skip_bad_lines: bool = False, for_training: bool = True) -> list[dict]:
    """The rows of a JSONL file; every malformed line is reported by number (or skipped, with a warning)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    rows, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append((number, f"invalid JSON ({error.msg} at column {error.colno})"))
                continue
            problem = _row_problem(row, for_training)
            if problem:
                problems.append((number, problem))
            else:
                rows.append(row)
    if problems:
        listed = "; ".join(f"line {n}: {why}" for n, why in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        if not skip_bad_lines:
            raise UserError(
                f"{path} has {len(problems)} malformed line(s): {listed}{more}. "
                "Fix them, or pass --skip-bad-lines to train without them"
            )
        print(f"warning: skipped {len(problems)} malformed line(s) of {path}: {listed}{more}", flush=True)
    if not rows:
        raise UserError(f"{path} has no usable rows")
    return rows


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _ids(tokenizer, text: str) -> list[int]:
    # A chat template that writes the BOS token itself must not get a second one from the tokenizer.
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _messages(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    instruction = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
    messages = [{"role": "user", "content": instruction}]
    return messages + ([{"role": "assistant", "content": row["response"]}] if "response" in row else [])


def encode_row(row: dict, tokenizer) -> Example:
    """Token ids and labels of one row: every token for "text", assistant tokens for chat rows."""
    if "text" in row:
        ids = _ids(tokenizer, row["text"])
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return Example(ids, list(ids))
    messages = _messages(row)
    ids = _ids(tokenizer, _chat(tokenizer, messages, add_generation_prompt=False))
    labels = [IGNORE] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The response span: from where the prompt (with the generation prompt) stops matching to
        # where the conversation up to this turn stops matching; robust to merges at the boundary.
        start = _common_prefix(_ids(tokenizer, _chat(tokenizer, messages[:turn], add_generation_prompt=True)), ids)
        end = _common_prefix(_ids(tokenizer, _chat(tokenizer, messages[: turn + 1], add_generation_prompt=False)), ids)
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def tokenize(
    rows: list[dict], tokenizer, max_length: int, packing: bool = False, source: str = "data"
) -> TokenizedData:
    """Encode rows, truncating to max_length (counted); packing concatenates them into max_length blocks."""
    data = TokenizedData([], len(rows))
    for index, row in enumerate(rows):
        try:
            example = encode_row(row, tokenizer)
        except Exception as error:  # a chat template may reject a conversation (roles out of order, ...)
            raise UserError(f"{source}: row {index + 1} cannot be rendered with the chat template: {error}") from None
        if not packing and len(example.input_ids) > max_length:
            data.truncated += 1
            example = Example(example.input_ids[:max_length], example.labels[:max_length])
        if example.label_count == 0 and not packing:
            data.dropped += 1
            continue
        data.examples.append(example)
    if packing:
        ids = [t for e in data.examples for t in e.input_ids]
        labels = [t for e in data.examples for t in e.labels]
        blocks = [Example(ids[i : i + max_length], labels[i : i + max_length]) for i in range(0, len(ids), max_length)]
        data.examples = [b for b in blocks if b.label_count > 0]
    if not data.examples:
        raise UserError(f"{source}: no training sequence has a response token within max_length {max_length}")
    return data


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class StepSampler:
    """Which examples each process uses in each micro-step: an epoch-wise permutation seeded by
    (seed, epoch), walked in order, so step s's data depends on s alone (exact resume, and the
    same global batch for any number of processes)."""

    def __init__(self, size: int, batch_size: int, seed: int, num_processes: int = 1) -> None:
        self.size, self.batch_size, self.seed, self.num_processes = size, batch_size, seed, num_processes
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders = {
                epoch: torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + 7919 * epoch))
            }
        return self._orders[epoch]

    def indices(self, micro_step: int, process_index: int | None = None) -> list[int]:
        """This process's indices (all processes' if process_index is None) of one micro-step."""
        global_batch = self.batch_size * self.num_processes
        first = micro_step * global_batch + (0 if process_index is None else process_index * self.batch_size)
        count = global_batch if process_index is None else self.batch_size
        out = []
        for position in range(first, first + count):
            epoch, offset = divmod(position, self.size)
            out.append(int(self._order(epoch)[offset]))
        return out


# =============================================================================================
# Model: check on the meta device, then load.
# =============================================================================================
def model_source(base: str) -> str:
    """A folder or hub id transformers can load ("embedded" -> the shipped tiny Llama)."""
    from pipelines.base import EMBEDDED_LM, EMBEDDED_LM_NAMES

    if base in EMBEDDED_LM_NAMES:
        if not (EMBEDDED_LM / "config.json").is_file():
            raise UserError(
                f"the embedded tiny LM is missing from {EMBEDDED_LM}; rebuild it with `studio pretrain-base`"
            )
        return str(EMBEDDED_LM)
    path = Path(base).expanduser()
    if path.exists():
        return str(path)
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise UserError(f"language model {base!r} not found: no such folder, and not a hub id (owner/name)")
    return base


def _loram_keep(train: LlmTrainConfig, num_layers: int) -> tuple[int, int]:
    first = train.loram_keep_first if train.loram_keep_first >= 0 else min(4, num_layers // 4)
    last = train.loram_keep_last if train.loram_keep_last >= 0 else min(2, num_layers // 4)
    return first, last


def check_method_on_model(job: LlmJob) -> None:
    """Fail before any weight is loaded: the method's targets and LoRAM's pruning against the
    architecture (a model built from its config on the meta device), 4-bit and 8-bit requirements."""
    from transformers import AutoConfig, AutoModelForCausalLM

    train, method = job.train, job.adapter.method
    if train.load_in_4bit or train.optimizer == "adamw8bit":
        what = "--load-in-4bit (an NF4 base)" if train.load_in_4bit else "--optimizer adamw8bit"
        if job.cpu or not torch.cuda.is_available():
            raise UserError(f"{what} needs a CUDA GPU (bitsandbytes); on this machine train without it")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError(f"{what} needs bitsandbytes: pip install 'peft-studio[quant]'") from None
    if train.load_in_4bit and method not in NF4_METHODS:
        raise UserError(
            f"method {method!r} cannot train on an NF4 base (it needs dense weights); "
            f"methods that can: {', '.join(NF4_METHODS)}"
        )
    if train.loram_ratio > 0 and method not in LORAM_METHODS:
        raise UserError(
            f"LoRAM recovers {', '.join(LORAM_METHODS)} adapters only, not {method!r}; "
            "pick --method lora or paca with --loram-ratio"
        )
    if job.save_merged and method not in MERGEABLE:
        raise UserError(
            f"--save-merged: a {method!r} adapter cannot be merged into the weights "
            "(its update is not linear in them); keep the adapter"
        )
    if job.export_peft and method not in ("lora", "paca", "corda", "plp", "spt"):
        raise UserError(f"--export-peft: a {method!r} adapter has no exact low-rank form, so PEFT cannot load it")
    source = model_source(job.base)
    try:
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"could not read the model config of {job.base!r}: {str(error).splitlines()[0]}") from None
    from peft_core.targets import find_targets

    try:
        if train.loram_ratio > 0:
            from peft_core.methods import loram

            layers = loram.find_decoder_layers(skeleton)
            first, last = _loram_keep(train, len(layers))
            if train.loram_strategy in ("random", "norm") and len(layers) - first - last <= 0:
                raise UserError(
                    f"LoRAM keeps the first {first} and last {last} of this model's {len(layers)} decoder "
                    "layers whole, so it would prune nothing; lower --loram-keep-first/--loram-keep-last"
                )
        find_targets(
            skeleton, job.adapter.targets, job.adapter.exclude, get_method(method).adapter_class.supported_types
        )
    except AdapterError as error:
        raise UserError(f"{method} does not fit {job.base!r} ({type(skeleton).__name__}): {error}") from None


def load_model(job: LlmJob, device: torch.device):
    """(model, tokenizer) on `device`, base frozen; NF4 projections when load_in_4bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, train = model_source(job.base), job.train
    kwargs: dict[str, Any] = {"dtype": DTYPES[train.base_dtype]}
    if train.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if train.base_dtype == "float32" else DTYPES[train.base_dtype]
        kwargs.update(
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            ),
            device_map={"": device},
            dtype=compute,
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        from pipelines.base import _offline_hint

        raise UserError(f"could not load language model {job.base!r}: {_offline_hint(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    if not train.load_in_4bit:
        model.to(device)
    return model, tokenizer


def load_tokenizer(job: LlmJob):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_source(job.base))
    except OSError as error:
        from pipelines.base import _offline_hint

        raise UserError(f"could not load the tokenizer of {job.base!r}: {_offline_hint(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# =============================================================================================
# Loss and evaluation.
# =============================================================================================
def token_loss_sum(model, batch: dict[str, torch.Tensor], chunk_tokens: int = 0) -> torch.Tensor:
    """Sum over response tokens of the next-token cross-entropy (float32).

    chunk_tokens > 0: never hold the whole (tokens x vocab) logits (chunked_token_loss_sum); the
    model must be the bare Hugging Face model (not wrapped for DDP) with a plain linear output layer.
    """
    if chunk_tokens > 0:
        head, config = model.get_output_embeddings(), model.config
        if not isinstance(head, torch.nn.Linear) or any(getattr(config, key, None) for key in LOGIT_TRANSFORMS):
            raise UserError(
                f"loss_chunk_tokens: {type(model).__name__} does not compute its logits as a plain linear layer "
                "of the last hidden state (output layer or logit scaling/soft-capping): set loss_chunk_tokens=0"
            )
        hidden = model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        return chunked_token_loss_sum(hidden[:, :-1], head, batch["labels"][:, 1:], chunk_tokens)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, targets = logits[:, :-1], batch["labels"][:, 1:]  # (B, T-1, V), (B, T-1)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def chunked_token_loss_sum(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """sum_t CE(head(hidden_t), targets_t) over the positions whose target is not IGNORE (at least float32).

    With a 128k vocabulary the logits of one 2048-token sequence take 1 GiB in float32, and the
    plain loss keeps them (and their gradient) alive; here each chunk's logits exist only inside
    its own forward and are recomputed in backward (activation checkpointing), so the peak holds
    one chunk of logits. Positions without a target are dropped first: no head compute for them.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE
    hidden, targets = hidden[keep], targets[keep]

    def chunk_loss(chunk_hidden: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        logits = head(chunk_hidden)
        return F.cross_entropy(
            logits.to(torch.promote_types(logits.dtype, torch.float32)), chunk_targets, reduction="sum"
        )

    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, targets.numel(), chunk_tokens):
        end = start + chunk_tokens
        total = total + torch.utils.checkpoint.checkpoint(
            chunk_loss, hidden[start:end], targets[start:end], use_reentrant=False
        )
    return total


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], pad_id: int, batch_size: int, device) -> dict[str, float]:
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        total += float(token_loss_sum(model, batch))
        tokens += sum(e.label_count for e in chunk)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _choice_prompt(row: dict, tokenizer) -> str:
    if "prompt" in row:
        return row["prompt"]
    messages = [m for m in _messages(row) if m["role"] != "assistant"] if "instruction" in row else row["messages"]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return _chat(tokenizer, messages, add_generation_prompt=True)


def _continuations(prompt: str, choices: list[str], tokenizer) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and each choice's continuation ids (the tokens after the prompt's)."""
    prompt_ids = _ids(tokenizer, prompt)
    joiner = "" if not prompt or prompt[-1].isspace() else " "
    continuations = []
    for choice in choices:
        full = _ids(tokenizer, prompt + joiner + choice)
        shared = _common_prefix(prompt_ids, full)
        continuations.append(full[shared:] or tokenizer(choice, add_special_tokens=False).input_ids)
    return prompt_ids, continuations


@torch.no_grad()
def multiple_choice_accuracy(model, rows: list[dict], tokenizer, batch_size: int, device) -> float:
    """Share of items whose most likely choice (sum of its tokens' log-probabilities) is the answer."""
    pad = tokenizer.pad_token_id
    items = [(*_continuations(_choice_prompt(r, tokenizer), r["choices"], tokenizer), r["answer"]) for r in rows]
    correct = 0
    single = [it for it in items if all(len(c) == 1 for c in it[1])]
    multi = [it for it in items if not all(len(c) == 1 for c in it[1])]
    for start in range(0, len(single), batch_size):  # one-token choices: one forward per batch of prompts
        chunk = single[start : start + batch_size]
        batch = collate([Example(p, p) for p, _, _ in chunk], pad)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        last = batch["attention_mask"].sum(1) - 1  # (B,) position of each prompt's last token
        next_logits = logits[torch.arange(len(chunk)), last.to(device)]  # (B, V)
        for row_logits, (_, continuations, answer) in zip(next_logits, chunk):
            correct += int(int(row_logits[[c[0] for c in continuations]].argmax()) == answer)
    for prompt_ids, continuations, answer in multi:  # general case: every choice as its own sequence
        batch = collate([Example(prompt_ids + c, [IGNORE] * len(prompt_ids) + c) for c in continuations], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        scores = (logp * (targets != IGNORE)).sum(1)
        correct += int(int(scores.argmax()) == answer)
    return correct / len(items)


@dataclass
class EvalSet:
    name: str
    rows: list[dict]
    examples: list[Example]  # rows with a response (loss / perplexity)
    choice_rows: list[dict]  # rows with choices + answer (accuracy)


def load_eval_set(path: Path, tokenizer, train: LlmTrainConfig) -> EvalSet:
    rows = read_jsonl(path, train.skip_bad_lines, for_training=False)
    trainable = [
        r
        for r in rows
        if "text" in r or "response" in r or any(m.get("role") == "assistant" for m in r.get("messages", []))
    ]
    examples = tokenize(trainable, tokenizer, train.max_length, source=str(path)).examples if trainable else []
    return EvalSet(path.stem, rows, examples, [r for r in rows if "choices" in r])


def evaluate(model, eval_sets: list[EvalSet], tokenizer, batch_size: int, device) -> dict[str, float]:
    """{"<set>/loss", "<set>/perplexity", "<set>/accuracy"} for every held-out set."""
    was_training = model.training
    model.eval()
    metrics = {}
    for eval_set in eval_sets:
        if eval_set.examples:
            for key, value in evaluate_loss(
                model, eval_set.examples, tokenizer.pad_token_id, batch_size, device
            ).items():
                metrics[f"{eval_set.name}/{key}"] = value
        if eval_set.choice_rows:
            metrics[f"{eval_set.name}/accuracy"] = multiple_choice_accuracy(
                model, eval_set.choice_rows, tokenizer, batch_size, device
            )
    model.train(was_training)
    return metrics


# =============================================================================================
# The run.
# =============================================================================================
@dataclass
class LlmResult:
    adapter_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    losses: list[float]
    trainable_params: int
    wall_s: float
    peak_gib: float | None = None
    merged_dir: Path | None = None
    peft_dir: Path | None = None


def default_data() -> tuple[Path, list[Path]]:
    """The embedded demo: the tiny LM's held-out addition task (train / test) and its knowledge probe."""
    from pipelines.base import embedded_lm_data

    return embedded_lm_data("task_add_train.jsonl"), [
        embedded_lm_data("task_add_test.jsonl"),
        embedded_lm_data("knowledge_probe.jsonl"),
    ]


def _calibration_batches(job: LlmJob, examples: list[Example], tokenizer, device) -> Iterator[dict[str, torch.Tensor]]:
    """CorDA / SPT data: the first `calibration_examples` examples, in training-size batches."""
    chosen = examples[: job.train.calibration_examples]
    for start in range(0, len(chosen), job.train.batch_size):
        yield {
            k: v.to(device)
            for k, v in collate(chosen[start : start + job.train.batch_size], tokenizer.pad_token_id).items()
        }


def _resume_checkpoint(run_dir: Path) -> Path | None:
    from pipelines.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir)


def train_llm(
    job: LlmJob,
    run_dir: str | os.PathLike,
    on_event: Callable[[LlmEvent], Any] | None = None,
    accelerator=None,
    adapter_name: str = "default",
    should_stop: Callable[[], bool] | None = None,
) -> LlmResult:
    """Check, set up, fit, evaluate, save (see the module docstring). Resumes from run_dir's newest
    checkpoint if there is one. Every process of an `accelerate launch` runs this; only the main
    process writes files and emits events.

    `should_stop()` is asked after every step (default: does `run_dir/STOP` exist?), as in the
    diffusion loop: when it answers yes, the step is checkpointed, the STOP file removed and
    `pipelines.train.StopRequested` (a KeyboardInterrupt) raised, so `--resume` continues from there.
    This is how the UI cancels an LLM job."""
    from peft_core.methods import loram
    from pipelines.checkpoint import load_checkpoint, save_checkpoint
    from pipelines.train import (
        STOP_FILE,
        StopRequested,
        make_accelerator,
        make_lr_scheduler,
        make_optimizer,
        stop_requested,
    )

    run_dir, train = Path(run_dir), job.train
    should_stop = should_stop or (lambda: (run_dir / STOP_FILE).exists())
    accelerator = accelerator or make_accelerator(train.mixed_precision, cpu=job.cpu)
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise UserError(
            f"train-llm runs data-parallel (DDP) only, not {accelerator.distributed_type.value}: adapters are "
            "saved and recovered from unsharded tensors (docs/llm.md says which methods could shard and why)"
        )
    main = accelerator.is_main_process
    emit = (on_event or (lambda event: None)) if main else (lambda event: None)
    started = time.perf_counter()

    # 1. Check everything before loading weights: config, method vs architecture, data.
    train.check()
    if train.loss_chunk_tokens and accelerator.num_processes > 1:
        raise UserError(
            "loss_chunk_tokens works in one process only for now (the chunked loss bypasses the DDP "
            "wrapper's forward, which would skip the gradient all-reduce): set it to 0 with several processes"
        )
    check_method_on_model(job)
    if job.data is None:
        job.data, job.eval_data = default_data()
    tokenizer = load_tokenizer(job)
    data = tokenize(
        read_jsonl(job.data, train.skip_bad_lines), tokenizer, train.max_length, train.packing, str(job.data)
    )
    emit(LlmEvent("data", 0, train.steps, message=data.summary(job.data, train.max_length)))
    eval_sets = [load_eval_set(Path(path), tokenizer, train) for path in job.eval_data]
    calibration = data.examples
    if job.calibration_data is not None:
        calibration = tokenize(
            read_jsonl(job.calibration_data, train.skip_bad_lines),
            tokenizer,
            train.max_length,
            source=str(job.calibration_data),
        ).examples

    # 2. Set up: model, LoRAM's prune, the method's prepare step, adapter, optimizer, schedule.
    torch.manual_seed(train.seed)
    device = accelerator.device
    model, tokenizer = load_model(job, device)
    before = {}
    checkpoint = _resume_checkpoint(run_dir)
    if main and checkpoint is None and eval_sets:
        before = evaluate(model, eval_sets, tokenizer, train.eval_batch_size, device)
        emit(LlmEvent("eval", 0, train.steps, metrics={"when": "before", **before}))
    full_model, index_map = None, None
    if train.loram_ratio > 0:
        first, last = _loram_keep(train, len(loram.find_decoder_layers(model)))
        full_model = model.to("cpu")  # the large model waits on the CPU; only the small one trains
        model, index_map = loram.prune(
            full_model, train.loram_ratio, train.loram_strategy, first, last, seed=train.seed
        )
        model.to(device)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if checkpoint is not None:  # the checkpoint's adapter rebuilds itself (prepared data included) without data
        handle = load_adapter(model, checkpoint / "adapter" / adapter_name, name=adapter_name, trainable=True)
    elif get_method(job.adapter.method).prepare is not None:
        prepared = get_method(job.adapter.method).prepare(
            model, job.adapter, _calibration_batches(job, calibration, tokenizer, device)
        )
        handle = attach(model, job.adapter, name=adapter_name, prepared=prepared)
    else:
        handle = attach(model, job.adapter, name=adapter_name)
    parameters = handle.trainable_parameters()
    trainable_params = sum(p.numel() for p in parameters)
    optimizer = make_optimizer(parameters, train, device)
    lr_scheduler = make_lr_scheduler(optimizer, train)
    handle.track_optimizer(optimizer)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    start_step = 0
    if checkpoint is not None:
        start_step = load_checkpoint(checkpoint, handle, optimizer, lr_scheduler)["step"]
        before = _read_before(run_dir)

    # 3. Fit. loss = sum of response-token losses / tokens in the whole global step (all micro-batches,
    # all processes), times the process count because DDP averages gradients: any split of the same
    # global batch gives the same gradient.
    if torch.cuda.is_available() and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler = StepSampler(len(data.examples), train.batch_size, train.seed, accelerator.num_processes)
    processes, accumulation = accelerator.num_processes, train.gradient_accumulation
    wrapped.train()
    losses, fit_started = [], time.perf_counter()
    for step in range(start_step, train.steps):
        micro_steps = range(step * accumulation, (step + 1) * accumulation)
        tokens = sum(data.examples[i].label_count for m in micro_steps for i in sampler.indices(m))
        step_loss = torch.zeros((), device=device)
        for number, micro in enumerate(micro_steps):
            examples = [data.examples[i] for i in sampler.indices(micro, accelerator.process_index)]
            batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
            sync = number == accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(wrapped), accelerator.autocast():
                loss_sum = token_loss_sum(wrapped, batch, train.loss_chunk_tokens)
                accelerator.backward(loss_sum * (processes / tokens))
            step_loss += loss_sum.detach() / tokens
        if train.max_grad_norm > 0:
            accelerator.clip_grad_norm_(parameters, train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        step_loss = float(accelerator.reduce(step_loss, "sum"))
        losses.append(step_loss)
        done = step + 1
        eta = (time.perf_counter() - fit_started) / (done - start_step) * (train.steps - done)
        emit(LlmEvent("step", done, train.steps, loss=step_loss, lr=lr_scheduler.get_last_lr()[0], eta_s=eta))
        if main and train.eval_every and done % train.eval_every == 0 and done < train.steps and eval_sets:
            emit(
                LlmEvent(
                    "eval",
                    done,
                    train.steps,
                    metrics=evaluate(
                        accelerator.unwrap_model(wrapped), eval_sets, tokenizer, train.eval_batch_size, device
                    ),
                )
            )
        stop = done < train.steps and stop_requested(should_stop, accelerator)
        if main and (stop or done % train.checkpoint_every == 0 or done == train.steps):
            path = save_checkpoint(
                run_dir,
                done,
                handle,
                [adapter_name],
                optimizer,
                lr_scheduler,
                extra={"loss": step_loss, "before": before},
            )
            emit(LlmEvent("checkpoint", done, train.steps, path=str(path)))
        if stop:
            accelerator.wait_for_everyone()
            if main:
                (run_dir / STOP_FILE).unlink(missing_ok=True)  # the request is served; a resume must not stop again
            raise StopRequested(f"stopped on request after step {done} of {train.steps}; the checkpoint resumes it")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    accelerator.wait_for_everyone()

    # 4. Evaluate and 5. save (main process). LoRAM: recover the adapter to the full shapes and
    # evaluate it on the full model (train small, infer large).
    adapter_dir = run_dir / "adapter" / adapter_name
    result = LlmResult(adapter_dir, before, {}, losses, trainable_params, 0.0, peak)
    if main:
        model = accelerator.unwrap_model(wrapped)
        if index_map is not None:
            loram.recover(handle, index_map, adapter_dir, name=adapter_name)
            del model, wrapped, handle
            model = full_model.to(device)
            handle = load_adapter(model, adapter_dir, name=adapter_name)
        else:
            handle.save(adapter_dir, name=adapter_name)
        if eval_sets:
            result.after = evaluate(model, eval_sets, tokenizer, train.eval_batch_size, device)
            emit(LlmEvent("eval", train.steps, train.steps, metrics={"when": "after", **result.after}))
        if job.export_peft:
            result.peft_dir = handle.export(
                run_dir / "peft",
                format="peft",
                name=adapter_name,
                task_type="CAUSAL_LM",
                base_model_name_or_path=model_source(job.base),
            )
        if job.save_merged:
            result.merged_dir = save_merged(job, adapter_dir, run_dir / "merged", tokenizer)
        result.wall_s = time.perf_counter() - started
        emit(
            LlmEvent(
                "done",
                train.steps,
                train.steps,
                loss=losses[-1] if losses else None,
                path=str(adapter_dir),
                metrics={"trainable_params": trainable_params, "wall_s": result.wall_s, "peak_gib": peak},
            )
        )
    accelerator.wait_for_everyone()
    return result


def _read_before(run_dir: Path) -> dict[str, float]:
    from peft_core.io import read_json
    from pipelines.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    return read_json(checkpoint / "state.json")["extra"].get("before", {}) if checkpoint else {}


def save_merged(job: LlmJob, adapter_dir: Path, out_dir: Path, tokenizer) -> Path:
    """A plain transformers model with the adapter folded in, from a fresh full-precision base on the
    CPU (so it also works after an NF4 or LoRAM run, where the trained model cannot take the merge)."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[job.train.base_dtype]
    model = AutoModelForCausalLM.from_pretrained(model_source(job.base), dtype=dtype)
    handle = load_adapter(model, adapter_dir)
    merged = handle.unload(merge=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# =============================================================================================
# Generation: talk to a trained run.
# =============================================================================================
def load_for_generation(
    run_dir: str | os.PathLike | None = None, base: str | None = None, device: str | torch.device | None = None
):
    """(model, tokenizer) ready for `generate_text`: a finished `studio train-llm` run's base with its
    final adapter loaded (LoRAM runs: the recovered, full-size adapter), or a base alone when
    `run_dir` is None. `base` overrides the run's own base (default "embedded")."""
    from studio.runs import Run

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if run_dir is None:
        job = LlmJob(adapter=None, base=base or "embedded")  # no adapter: load_model reads only base and train
        model, tokenizer = load_model(job, device)
        model.eval()
        return model, tokenizer
    run = Run.open(run_dir)
    config = run.config
    if config.get("kind") != "train-llm":
        raise UserError(f"{run.directory} is a {config.get('kind')} run, not a `studio train-llm` run")
    adapters = sorted(p for p in (run.directory / "adapter").glob("*") if (p / "adapter_config.json").is_file())
    if not adapters:
        raise UserError(
            f"{run.directory} has no final adapter (status: {run.info.get('status')}); "
            "resume it to the end or pick a finished run"
        )
    job = job_from_record(config)
    if base is not None:
        job.base = base
    model, tokenizer = load_model(job, device)
    load_adapter(model, adapters[0])
    model.eval()
    return model, tokenizer


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = True,
) -> str:
    """The model's continuation of `prompt` (new text only, special tokens dropped).

    chat=True renders the prompt as one user turn with the tokenizer's chat template (the
    fallback template if it has none) plus the generation prompt, exactly as the trainer renders
    an instruction row, so a model trained on instruction/chat rows sees its training format;
    chat=False continues the raw text. temperature 0 is greedy (deterministic); above 0 samples,
    reproducibly from `seed`."""
    if not prompt or not prompt.strip():
        raise UserError("write a prompt")
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise UserError(
            f"max_new_tokens must be >= 1, temperature >= 0 and top_p in (0, 1]; "
            f"got {max_new_tokens}, {temperature}, {top_p}"
        )
    text = _chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True) if chat else prompt
    device = next(model.parameters()).device
    input_ids = torch.tensor([_ids(tokenizer, text)], device=device)  # (1, T)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and input_ids.shape[1] >= limit:
        raise UserError(f"the prompt is {input_ids.shape[1]} tokens; this model reads at most {limit}")
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - input_ids.shape[1])
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            top_k=None,
            **sampling,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


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
    from studio.options import build_dataclass

    optional = lambda key: None if record.get(key) is None else Path(record[key])  # noqa: E731
    return LlmJob(
        adapter=config_from_dict(record["adapter"]),
        train=build_dataclass(LlmTrainConfig, dict(record["train"]), "the run's config"),
        data=optional("data"),
        eval_data=[Path(p) for p in record.get("eval_data", [])],
        calibration_data=optional("calibration_data"),
        base=record["base"],
        save_merged=record.get("save_merged", False),
        export_peft=record.get("export_peft", False),
        cpu=record.get("cpu", False),
    )


def method_defaults(method: str) -> tuple[list[str], dict[str, Any]]:
    """(default targets, default hyperparameters) of a method in the LLM trainer.

    LoRA r=8, alpha=16; PaCA r=16, alpha=32 (parameter-matched to LoRA r=8 on square layers, same
    scale); CorDA r=8, alpha=16; Compacter at the paper's Llama placement (after o_proj and down_proj)."""
    if method == "compacter":
        return [], {"placement": "llama"}
    defaults = {
        "lora": {"r": 8, "alpha": 16.0},
        "paca": {"r": 16, "alpha": 32.0},
        "corda": {"r": 8, "alpha": 16.0},
        "plp": {"r": 8},
        "spt": {"r": 8},
    }
    return ["all-linear"], defaults.get(method, {})
