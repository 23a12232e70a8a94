"""LLM data: JSONL rows -> token ids with labels, and which examples each step trains on.

Rows (JSONL, one object a line): {"text"}, {"instruction", "response"} (optional "input") or
{"messages": [{"role", "content"}, ...]} rendered with the tokenizer's chat template; the loss
covers the response / assistant tokens only (everything for "text"). Evaluation rows may instead
be multiple-choice items {"prompt" or "instruction", "choices", "answer" (index)}.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.errors import UserError

IGNORE = -100  # label of tokens that carry no loss (prompts, padding)
# Used when a tokenizer has no chat template of its own (base models usually have none).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}### response:\n{{ message['content'] }}"
    "{{ eos_token }}\n{% else %}### {{ message['role'] }}:\n{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### response:\n{% endif %}"
)


# Methods whose adapter LoRAM can recover from a pruned model, and methods that can sit on an NF4 base.
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
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            try:  # strictly UTF-8 (a BOM on the first line is fine): Latin-1 text must not train as mojibake
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                byte = error.object[error.start]
                problems.append(
                    (number, f"not UTF-8 (byte {byte:#04x} at column {error.start + 1}); re-save the file as UTF-8")
                )
                continue
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


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """`messages` as text, with the tokenizer's chat template (FALLBACK_CHAT_TEMPLATE if it has none)."""
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, with the tokenizer's special tokens unless the text starts with BOS."""
    # A chat template that writes the BOS token itself must not get a second one from the tokenizer.
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def row_messages(row: dict) -> list[dict]:
    """A chat or instruction row as chat messages (user turn, then the response if any)."""
    if "messages" in row:
        return row["messages"]
    instruction = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
    messages = [{"role": "user", "content": instruction}]
    return messages + ([{"role": "assistant", "content": row["response"]}] if "response" in row else [])


def encode_row(row: dict, tokenizer) -> Example:
    """Token ids and labels of one row: every token for "text", assistant tokens for chat rows."""
    if "text" in row:
        ids = token_ids(tokenizer, row["text"])
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return Example(ids, list(ids))
    messages = row_messages(row)
    ids = token_ids(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=False))
    labels = [IGNORE] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The response span: from where the prompt (with the generation prompt) stops matching to
        # where the conversation up to this turn stops matching; robust to merges at the boundary.
        start = common_prefix(
            token_ids(tokenizer, render_chat(tokenizer, messages[:turn], add_generation_prompt=True)), ids
        )
        end = common_prefix(
            token_ids(tokenizer, render_chat(tokenizer, messages[: turn + 1], add_generation_prompt=False)), ids
        )
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


def default_data() -> tuple[Path, list[Path]]:
    """The embedded demo: the tiny LM's held-out addition task (train / test) and its knowledge probe."""
    from pipelines.base import embedded_lm_data

    return embedded_lm_data("task_add_train.jsonl"), [
        embedded_lm_data("task_add_test.jsonl"),
        embedded_lm_data("knowledge_probe.jsonl"),
    ]
