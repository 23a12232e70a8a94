"""LLM data: rows in any of six formats -> token ids with labels, and which examples each step trains on.

Formats (one per file, detected from its first row's fields, or forced with --format):

    preference         {"prompt", "chosen", "rejected"}                 DPO / ORPO pairs (studio.llm.preference)
    messages           {"messages": [{"role", "content"}, ...]}          OpenAI chat; loss on assistant turns
    sharegpt           {"conversations": [{"from", "value"}, ...]}      from: system | human | gpt
    alpaca             {"instruction", "input"?, "output", "system"?}   "response" works for "output"
    prompt-completion  {"prompt", "completion"}                         loss on the completion only
    text               {"text"}                                         continued pretraining: loss everywhere

Preference rows are strings ({"prompt", "chosen", "rejected"}) or TRL's conversational form: "chosen" and
"rejected" as message lists, with the "prompt" messages given, or implicit as their shared leading messages.

Files: JSONL (one object a line), JSON (a list of rows), CSV and Parquet (read through the `datasets`
library; CSV falls back to the standard library without it), or a hub dataset id ("owner/name", through
`datasets.load_dataset`). Every malformed row is reported by line (JSONL) or row number.

Every row becomes one internal form: {"messages": [...]} (chat-like formats, rendered with the tokenizer's
chat template, loss on assistant tokens), {"prompt", "response"} (plain text concatenated, loss on the
response), {"text"}, or a preference pair {"prompt", "chosen", "rejected"} (all strings, or all message
lists: the prompt's and each response's). Evaluation rows may instead be multiple-choice items ("choices" +
"answer", the prompt given the file's way: "prompt", "instruction", "messages" or "conversations").

Packing concatenates examples into max_length blocks; each block remembers where its examples start
(`Example.segments`), so positions restart and attention never crosses examples (`model_inputs`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
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

# The data formats, and the field that marks each one, in the order auto-detection tries them
# (preference first: its rows carry a "prompt" too; alpaca before text: Alpaca dumps often carry a
# pre-rendered "text" column too).
FORMAT_FIELDS = {
    "preference": "chosen",
    "messages": "messages",
    "sharegpt": "conversations",
    "alpaca": "instruction",
    "prompt-completion": "prompt",
    "text": "text",
}
DATA_FORMATS = ("auto", *FORMAT_FIELDS)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TOOL_ROLES = ("tool", "function", "function_call", "function_response", "observation", "tool_call", "ipython")
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".pq", ".txt", ".ndjson")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    # Packed blocks: the lengths of the examples (or pieces of examples) laid end to end in this
    # block; each starts at position 0 and sees only itself. None: one ordinary example.
    segments: list[int] | None = None

    @property
    def label_count(self) -> int:  # tokens predicted after the causal shift
        return sum(label != IGNORE for label in self.labels[1:])

    @property
    def position_ids(self) -> list[int]:
        return [p for n in (self.segments or [len(self.input_ids)]) for p in range(n)]


@dataclass
class TokenizedData:
    examples: list[Example]
    rows: int
    truncated: int = 0
    dropped: int = 0  # no response token left after truncation
    format: str = ""  # the data format the rows came in
    packed: bool = False
    split: int = 0  # packing: rows continued in the next block

    def summary(self, path: Path | str, max_length: int) -> str:
        text = f"{path}: {self.rows} rows" + (f" ({self.format})" if self.format else "")
        text += f" -> {len(self.examples)} training sequences"
        if self.packed:
            text += f" (packed into max_length {max_length} blocks"
            text += f"; {self.split} rows continue in the next block)" if self.split else ")"
        if self.truncated:
            text += f"; {self.truncated} longer than max_length {max_length} were truncated"
        if self.dropped:
            text += f"; {self.dropped} dropped (no response token left after truncation)"
        return text


# ---------------------------------------------------------------------------------------------------
# Reading: files and hub datasets -> raw records (where, value), each numbered for error messages.


@dataclass
class RowSet:
    """The rows of one data source, in the internal form, with the malformed ones listed."""

    source: str
    rows: list[dict]
    format: str  # the data format ("" if no row had a known field)
    detected_from: str | None  # where auto-detection found it (None: --format said it)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (where, why): ("line 3", "invalid JSON")
    unit: str = "line"  # how `where` counts: JSONL lines, or rows

    def describe_format(self) -> str:
        if not self.format:
            return "unknown"
        return (
            f"{self.format} (detected from {self.detected_from})" if self.detected_from else f"{self.format} (--format)"
        )


class _Bad(Exception):
    """A malformed row; its message says why."""


def looks_like_hub_dataset(source: str) -> bool:
    """'owner/name' that is not a local path (and not a data file name with a missing folder)."""
    return (
        not Path(source).expanduser().exists()
        and bool(_HUB_DATASET.match(source))
        and not source.lower().endswith(_FILE_SUFFIXES)
    )


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(f"line {n}", row) per non-blank line; a _Bad instead of the row for undecodable lines."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            try:  # strictly UTF-8 (a BOM on the first line is fine): Latin-1 text must not train as mojibake
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                byte = error.object[error.start]
                yield (
                    f"line {number}",
                    _Bad(f"not UTF-8 (byte {byte:#04x} at column {error.start + 1}); re-save the file as UTF-8"),
                )
                continue
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                yield f"line {number}", _Bad(f"invalid JSON ({error.msg} at column {error.colno})")


def _json_records(path: Path) -> tuple[list[tuple[str, Any]], str]:
    """A JSON file: a list of rows ("row N"), or JSONL under a .json name."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        return [(f"line {line}", _Bad("not UTF-8; re-save the file as UTF-8"))], "line"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # one object a line: JSONL named .json
            return list(_jsonl_records(path)), "line"
        return [(f"line {error.lineno}", _Bad(f"invalid JSON ({error.msg} at column {error.colno})"))], "line"
    if not isinstance(value, list):
        raise UserError(
            f"{path} must hold a JSON list of rows (or one JSON object a line), not a {type(value).__name__}"
        )
    return [(f"row {i}", row) for i, row in enumerate(value, start=1)], "row"


def _without_nulls(value: Any) -> Any:
    """Tables fill a row's missing fields with null (None / NaN): drop them, so a row reads like its JSON."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None and v == v}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _table_records(rows, csv_cells: bool) -> list[tuple[str, Any]]:
    out = []
    for number, row in enumerate(rows, start=1):
        row = _without_nulls({k: v for k, v in dict(row).items() if k is not None})  # None: a CSV row's extra cells
        if csv_cells:
            row = {k: v for k, v in row.items() if v != ""}
            for key in ("messages", "conversations", "choices", "prompt", "completion", "chosen", "rejected"):
                if isinstance(row.get(key), str) and row[key].lstrip().startswith("["):  # a JSON list in a cell
                    with contextlib.suppress(json.JSONDecodeError):  # else plain text that starts with "["
                        row[key] = json.loads(row[key])
            if isinstance(row.get("answer"), str) and row["answer"].strip().isdigit():
                row["answer"] = int(row["answer"])
        out.append((f"row {number}", row))
    return out


def _load_with_datasets(kind: str, data_files: str | None, source: str, **options):
    """datasets.load_dataset(kind, data_files=..., **options) for local files (cached in a temporary
    folder), datasets.load_dataset(source) for a hub id; as plain rows."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"reading {source} needs the datasets library: pip install 'peft-studio[llm]' (or pip install datasets)"
        ) from None
    datasets.disable_progress_bars()
    if data_files is None:  # a hub dataset
        try:
            return datasets.load_dataset(source, split="train").to_list()
        except Exception as error:  # offline, unknown id, no train split, ...
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(
                f"{source} is not a local file, and loading it as a Hugging Face hub dataset failed: {first} "
                "(offline? give a local JSONL / JSON / CSV / Parquet file instead)"
            ) from None
    with tempfile.TemporaryDirectory(prefix="studio-data-") as cache:  # no stale cache, nothing left behind
        try:
            return datasets.load_dataset(
                kind, data_files=data_files, split="train", cache_dir=cache, **options
            ).to_list()
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{source} could not be read as {kind.upper()}: {first}") from None


def _csv_records(path: Path) -> list[tuple[str, Any]]:
    """CSV cells as written (text: no number or "NA" guessing), through datasets, else the standard library."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file)
            header = reader.fieldnames or []
            if not header:  # an empty file
                return []
            try:
                import datasets  # noqa: F401
            except ImportError:  # the standard library reads CSV too
                return _table_records(list(reader), csv_cells=True)
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path} could not be read as CSV: {error}") from None
    rows = _load_with_datasets("csv", str(path), str(path), converters=dict.fromkeys(header, str), na_filter=False)
    return _table_records(rows, csv_cells=True)


def raw_records(source: str | os.PathLike) -> tuple[list[tuple[str, Any]], str]:
    """The records of a data source before any check, each with where it is, and the unit ("line" / "row")."""
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists():
        if looks_like_hub_dataset(text):
            return _table_records(_load_with_datasets("", None, text), csv_cells=False), "row"
        raise UserError(f"data file {path} does not exist")
    if not path.is_file():
        raise UserError(f"data file {path} is a folder, not a file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _json_records(path)
    if suffix == ".csv":
        return _csv_records(path), "row"
    if suffix in TABLE_SUFFIXES:
        return _table_records(_load_with_datasets("parquet", str(path), str(path)), csv_cells=False), "row"
    return list(_jsonl_records(path)), "line"  # .jsonl, and any other name: one JSON object a line


# ---------------------------------------------------------------------------------------------------
# Formats: detection and each format's rows -> the internal form.


def row_format(row: Any) -> str | None:
    """The format a single row's fields say (None: no known field)."""
    if isinstance(row, dict):
        for name, marker in FORMAT_FIELDS.items():
            if marker in row:
                return name
    return None


def detect_format(records: list[tuple[str, Any]]) -> tuple[str | None, str | None]:
    """(format, where) from the first record with a known field; (None, None) if none has one."""
    for where, row in records:
        name = row_format(row)
        if name:
            return name, where
    return None, None


def _string(row: dict, key: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise _Bad(f'"{key}" must be a string' + ("" if key in row else " (missing)"))
    return value


def _check_messages(messages: Any, key: str = "messages") -> list[dict]:
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise _Bad(f'"{key}" must be a non-empty list of {{"role": str, "content": str}}')
    return [dict(m) for m in messages]


def _from_messages(row: dict) -> dict:
    return {"messages": _check_messages(row["messages"])}


def _from_sharegpt(row: dict) -> dict:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise _Bad('"conversations" must be a non-empty list of {"from": str, "value": str}')
    messages = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
    for number, turn in enumerate(turns, start=1):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise _Bad(f'"conversations" turn {number} must be {{"from": str, "value": str}}')
        role = turn["from"]
        if role.lower() in TOOL_ROLES:
            raise _Bad(
                f'"conversations" turn {number} has role "{role}": tool / function-calling turns are not supported'
            )
        if role.lower() not in SHAREGPT_ROLES:
            raise _Bad(f'"conversations" turn {number} has unknown role "{role}" (expected system, human or gpt)')
        messages.append({"role": SHAREGPT_ROLES[role.lower()], "content": turn["value"]})
    return {"messages": messages}


def _from_alpaca(row: dict) -> dict:
    instruction = _string(row, "instruction")
    extra, system = _string(row, "input", required=False), _string(row, "system", required=False)
    output_key = "output" if "output" in row else "response"
    output = _string(row, output_key, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": instruction + (f"\n{extra}" if extra else "")})
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return {"messages": messages}


def _from_prompt_completion(row: dict) -> dict:
    prompt = row["prompt"]
    completion_key = "completion" if "completion" in row else "response"
    completion = row.get(completion_key)
    if isinstance(prompt, list):  # conversational: prompt and completion are lists of messages
        messages = _check_messages(prompt, "prompt")
        if completion is not None:
            messages += _check_messages(completion, completion_key)
        return {"messages": messages}
    if not isinstance(prompt, str):
        raise _Bad('"prompt" must be a string (or a list of messages)')
    if completion is None:
        return {"prompt": prompt}
    if not isinstance(completion, str):
        raise _Bad(f'"{completion_key}" must be a string')
    return {"prompt": prompt, "response": completion}


def _from_preference(row: dict) -> dict:
    """{"prompt", "chosen", "rejected"}: three strings, or three message lists (TRL's conversational
    preference rows; without "prompt", the prompt is the leading messages "chosen" and "rejected" share)."""
    if "rejected" not in row:
        raise _Bad('a preference row needs "rejected" next to "chosen" (missing)')
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if not (isinstance(chosen, str) or isinstance(rejected, str)):
        return _preference_messages(chosen, rejected, prompt)
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise _Bad('"chosen" and "rejected" must both be strings, or both lists of messages')
    if not isinstance(prompt, str):
        raise _Bad('"prompt" must be a string' + ("" if "prompt" in row else " (missing)"))
    if not chosen or not rejected:
        raise _Bad('"chosen" and "rejected" must be non-empty strings')
    if chosen == rejected:
        raise _Bad('"chosen" and "rejected" are the same: nothing to prefer')
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _preference_messages(chosen: Any, rejected: Any, prompt: Any) -> dict:
    """A conversational preference row: the prompt messages (given, or the leading ones both sides share)
    and each side's response, which must be assistant messages."""
    chosen, rejected = _check_messages(chosen, "chosen"), _check_messages(rejected, "rejected")
    if chosen == rejected:
        raise _Bad('"chosen" and "rejected" are the same: nothing to prefer')
    if prompt is None:  # implicit prompt: the messages both conversations start with
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise _Bad('"chosen" and "rejected" share no leading (prompt) messages; give the "prompt" messages')
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif isinstance(prompt, list):
        prompt = _check_messages(prompt, "prompt")
    else:
        raise _Bad('"prompt" must be a list of messages when "chosen" and "rejected" are')
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages:
            raise _Bad(f'"{key}" has no response after the prompt')
        for number, message in enumerate(messages, start=1):
            if message["role"] != "assistant":
                raise _Bad(
                    f'"{key}" response message {number} has role "{message["role"]}": the responses after the '
                    "prompt must be assistant messages"
                )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def preference_side(row: dict, side: str) -> tuple[dict, int]:
    """One side ("chosen" / "rejected") of an internal preference row as an ordinary row, and the chat turn
    where its response starts (encode_row's `first_turn`: the loss is on the response only)."""
    if isinstance(row["prompt"], str):
        return {"prompt": row["prompt"], "response": row[side]}, 0
    return {"messages": [*row["prompt"], *row[side]]}, len(row["prompt"])


def _from_text(row: dict) -> dict:
    if not isinstance(row["text"], str) or not row["text"]:
        raise _Bad('"text" must be a non-empty string')
    return {"text": row["text"]}


_CONVERTERS = {
    "preference": _from_preference,
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt-completion": _from_prompt_completion,
    "text": _from_text,
}


# Why a row of each format has nothing to learn (a row without a response is an evaluation choice item only).
NOTHING_TO_LEARN = {
    "preference": 'a preference row needs "chosen" and "rejected"',
    "messages": '"messages" has no "assistant" message to learn',
    "sharegpt": '"conversations" has no "gpt" turn to learn',
    "alpaca": 'an "instruction" row needs an "output" (or "response")',
    "prompt-completion": 'a "prompt" row needs a "completion"',
    "text": '"text" must be a non-empty string',
}


def _expected(for_training: bool) -> str:
    return (
        '"messages", "conversations", "instruction" + "output", "prompt" + "completion", "text" '
        'or "prompt" + "chosen" + "rejected"'
    ) + ("" if for_training else ', or "choices" + "answer" with a prompt')


def _unknown(row: Any, for_training: bool) -> _Bad:
    """Why a row of no known format is malformed."""
    if not isinstance(row, dict):
        return _Bad(f"expected a JSON object, got {type(row).__name__}")
    return _Bad(f"no known fields (has {', '.join(sorted(row)) or 'none'}; expected {_expected(for_training)})")


def convert_row(row: Any, data_format: str, for_training: bool = True, where: str | None = None) -> dict:
    """One row in the internal form ({"messages"}, {"prompt", "response"} or {"text"}, plus "choices" and
    "answer" for evaluation rows), or _Bad saying why it cannot be. `where`: where the format was detected."""
    marker = FORMAT_FIELDS[data_format]
    if not isinstance(row, dict) or row_format(row) is None:
        raise _unknown(row, for_training)
    if marker not in row:
        keys = ", ".join(sorted(row))
        origin = f"detected from {where}" if where else "--format"
        raise _Bad(f'no "{marker}" field (has {keys}): this file holds {data_format} rows ({origin})')
    out = _CONVERTERS[data_format](row)
    choice = not for_training and "choices" in row
    if choice:
        problem = _choice_problem(row)
        if problem:
            raise _Bad(problem)
        out.update(choices=row["choices"], answer=row["answer"])
    learnable = "text" in out or "response" in out or "chosen" in out
    learnable = learnable or any(m["role"] == "assistant" for m in out.get("messages", ()))
    if not (learnable or choice):
        raise _Bad(NOTHING_TO_LEARN[data_format])
    return out


def _choice_problem(row: dict) -> str | None:
    choices, answer = row.get("choices"), row.get("answer")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        return '"choices" must be a list of at least two strings'
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return f'"answer" must be the index of the right choice (0..{len(choices) - 1})'
    return None


def load_rows(source: str | os.PathLike, data_format: str = "auto", for_training: bool = True) -> RowSet:
    """Every row of `source` in the internal form, and every malformed one listed (nothing raised for them;
    a missing or unreadable source is a UserError). `data_format`: one of DATA_FORMATS ("auto": detected
    from the first row with a known field)."""
    if data_format not in DATA_FORMATS:
        raise UserError(f"unknown data format {data_format!r}; one of {', '.join(DATA_FORMATS)}")
    records, unit = raw_records(source)
    where = None
    if data_format == "auto":
        data_format, where = detect_format(records)
    result = RowSet(str(source), [], data_format or "", where, unit=unit)
    for place, row in records:
        try:
            if isinstance(row, _Bad):
                raise row
            if data_format is None:
                raise _unknown(row, for_training)
            result.rows.append(convert_row(row, data_format, for_training, where))
        except _Bad as problem:
            result.problems.append((place, str(problem)))
    return result


def problem_list(problems: list[tuple[str, str]], limit: int = 10) -> str:
    """The first `limit` problems on one line, and how many more there are."""
    listed = "; ".join(f"{where}: {why}" for where, why in problems[:limit])
    return listed + (f" (and {len(problems) - limit} more)" if len(problems) > limit else "")


def read_data(
    source: str | os.PathLike, skip_bad_lines: bool = False, for_training: bool = True, data_format: str = "auto"
) -> RowSet:
    """`load_rows`, stopping on malformed rows (all listed, by line or row number) unless skip_bad_lines,
    which trains without them and says so; a source without a usable row is a UserError too."""
    data = load_rows(source, data_format, for_training)
    if data.problems:
        noun = f"malformed {data.unit}(s)"
        listed = problem_list(data.problems)
        if not skip_bad_lines:
            raise UserError(
                f"{source} has {len(data.problems)} {noun}: {listed}. "
                "Fix them, or pass --skip-bad-lines to train without them"
            )
        print(f"warning: skipped {len(data.problems)} {noun} of {source}: {listed}", flush=True)
    if not data.rows:
        raise UserError(f"{source} has no usable rows")
    return data


def read_jsonl(path: str | os.PathLike, skip_bad_lines: bool = False, for_training: bool = True) -> list[dict]:
    """The rows of a data file (any supported kind, despite the name), in the internal form, format detected."""
    return read_data(path, skip_bad_lines, for_training).rows


# ---------------------------------------------------------------------------------------------------
# Tokenization: internal rows -> Example (ids + labels), truncation, packing, batches.


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


def internal_row(row: dict) -> dict:
    """A row in the internal form (rows read by load_rows already are; a raw row's own fields say its format)."""
    name = row_format(row)
    if name is None:
        raise UserError(f"no known fields in row (has {', '.join(sorted(row)) or 'none'})")
    try:
        return convert_row(row, name, for_training="choices" not in row)
    except _Bad as error:
        raise UserError(str(error)) from None


def row_messages(row: dict) -> list[dict]:
    """A chat-like row as chat messages (an instruction row: system, user turn, then the response if any)."""
    return internal_row(row)["messages"]


def encode_row(row: dict, tokenizer, first_turn: int = 0) -> Example:
    """Token ids and labels of one row: every token for text, the completion for prompt-completion,
    the assistant tokens for chat-like rows (from chat turn `first_turn` on), the chosen side's response
    for a preference row (what `studio data check` shows; studio.llm.preference encodes both sides)."""
    row = internal_row(row)
    if "chosen" in row:
        side, first_turn = preference_side(row, "chosen")
        return encode_row(side, tokenizer, first_turn)
    if "text" in row:
        ids = token_ids(tokenizer, row["text"])
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return Example(ids, list(ids))
    if "prompt" in row:  # plain prompt + completion, concatenated as written
        ids = token_ids(tokenizer, row["prompt"] + row["response"])
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        start = common_prefix(token_ids(tokenizer, row["prompt"]), ids)  # robust to a merge at the seam
        return Example(ids, [IGNORE] * start + ids[start:])
    messages = row["messages"]
    ids = token_ids(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=False))
    labels = [IGNORE] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant" or turn < first_turn:
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


def encode_rows(rows: list[dict], tokenizer, source: str = "data") -> list[Example]:
    """Every row encoded; a row the chat template rejects is a UserError naming it."""
    examples = []
    for index, row in enumerate(rows):
        try:
            examples.append(encode_row(row, tokenizer))
        except UserError as error:
            raise UserError(f"{source}: row {index + 1}: {error}") from None
        except Exception as error:  # a chat template may reject a conversation (roles out of order, ...)
            raise UserError(f"{source}: row {index + 1} cannot be rendered with the chat template: {error}") from None
    return examples


def fit_length(examples: list[Example], max_length: int) -> tuple[list[Example], int, int]:
    """The trainer's rule without packing: longer examples are cut to max_length (counted), and those
    left without a response token are dropped (counted). Returns (kept, truncated, dropped)."""
    kept, truncated, dropped = [], 0, 0
    for example in examples:
        if len(example.input_ids) > max_length:
            truncated += 1
            example = Example(example.input_ids[:max_length], example.labels[:max_length])
        if example.label_count == 0:
            dropped += 1
            continue
        kept.append(example)
    return kept, truncated, dropped


def pack(examples: list[Example], max_length: int) -> tuple[list[Example], int]:
    """Examples laid end to end and cut into max_length blocks; returns (blocks, examples split).

    Each block records its segments (the examples, or the pieces of an example that continues in the
    next block); the first label of every segment is IGNORE, because the token before it belongs to
    another segment (unpacked, a sequence's first token is never predicted either). Blocks without a
    response token are left out."""
    blocks, ids, labels, segments, split = [], [], [], [], 0

    def close() -> None:
        if ids:
            blocks.append(Example(list(ids), list(labels), list(segments)))
        for part in (ids, labels, segments):
            part.clear()

    for example in examples:
        start, pieces = 0, 0
        while start < len(example.input_ids):
            end = start + max_length - len(ids)
            piece_ids, piece_labels = example.input_ids[start:end], example.labels[start:end]
            ids.extend(piece_ids)
            labels.extend([IGNORE, *piece_labels[1:]])
            segments.append(len(piece_ids))
            start, pieces = start + len(piece_ids), pieces + 1
            if len(ids) == max_length:
                close()
        split += int(pieces > 1)
    close()
    return [b for b in blocks if b.label_count > 0], split


def tokenize(
    rows: list[dict], tokenizer, max_length: int, packing: bool = False, source: str = "data", data_format: str = ""
) -> TokenizedData:
    """Encode rows; without packing each is truncated to max_length (counted) and dropped if no response
    token is left (counted); packing lays them into max_length blocks instead (`pack`)."""
    examples = encode_rows(rows, tokenizer, source)
    data = TokenizedData([], len(rows), format=data_format, packed=packing)
    if packing:
        data.examples, data.split = pack(examples, max_length)
    else:
        data.examples, data.truncated, data.dropped = fit_length(examples, max_length)
    if not data.examples:
        raise UserError(f"{source}: no training sequence has a response token within max_length {max_length}")
    return data


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding); packed blocks add
    position_ids, restarting at every segment (the padding is one more segment)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = any(e.segments is not None for e in examples)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(example.position_ids)
            positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    return {**batch, "position_ids": positions} if packed else batch


def model_inputs(
    batch: dict[str, torch.Tensor], attn_implementation: str | None, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """What the model gets for a collated batch: the batch itself unless it holds packed blocks.

    Packed blocks (a "position_ids" entry) must not let one example see another:
    - FlashAttention: the batch flattened to one padding-free row, attention_mask None, and the restarting
      position_ids, from which transformers derives the varlen boundaries (cu_seqlens);
    - every other implementation: a 4-D block-diagonal causal mask (batch, 1, T, T), boolean for SDPA
      (True: may attend), additive (0 / the dtype's minimum) for eager, flex and the rest.
    Either way the model must also get the position_ids (and use_cache=False, so that transformers
    never builds its own mask from a cache)."""
    if "position_ids" not in batch:
        return batch
    positions = batch["position_ids"]
    implementation = attn_implementation or "eager"
    if implementation.startswith("flash") or "flash_attn" in implementation:
        keep = batch["attention_mask"].bool()
        flat = {key: batch[key][keep][None] for key in ("input_ids", "labels", "position_ids")}
        return {**flat, "attention_mask": None}
    segment = (positions == 0).cumsum(-1)  # (B, T): which segment each token is in
    width = positions.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=positions.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    if implementation == "sdpa":
        mask = allowed[:, None]
    else:
        mask = torch.zeros(allowed[:, None].shape, dtype=dtype, device=positions.device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {**batch, "attention_mask": mask}


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
