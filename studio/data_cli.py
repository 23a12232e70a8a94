"""`studio data check`: what `studio train-llm` will make of a data file, before any training.

    studio data check train.jsonl                              # the embedded tiny LM's tokenizer
    studio data check chats.parquet --base meta-llama/Llama-3.2-1B --max-length 1024
    studio data check rows.csv --format prompt-completion
    studio data check owner/dataset                            # a hub dataset (through `datasets`)

Prints the row count, the format (detected from the first row with a known field, or --format), the
token lengths (p50 / p90 / p99 / max), how many rows --max-length would truncate or drop (the trainer's
own rule: longer rows are cut, rows left without a response token are dropped) and the first example
as the trainer renders it, one line per span with whether the loss covers it. Malformed rows are listed
(by line or row number) and make the exit code 1.

Registered with the studio's command line through the "studio.commands" entry point (pyproject.toml).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass

from pipelines.errors import UserError
from pipelines.options import option
from studio.llm.config import LlmTrainConfig
from studio.options import Section

HELP = "Check LLM training data: rows, format, token lengths, truncation, the loss mask of the first example."


def _trainer_option(name: str):
    """The trainer's own option (same flag, help, checks and default), so the check matches a run."""
    source = next(f for f in dataclasses.fields(LlmTrainConfig) if f.name == name)
    return dataclasses.field(default=source.default, metadata=source.metadata)


ACTIONS = ("check",)


@dataclass
class DataCheckOptions:
    action: str = option("check", help=f"what to do with the data ({' | '.join(ACTIONS)})", positional=True)
    file: str | None = option(
        None,
        help="a JSONL, JSON, CSV or Parquet file, or a hub dataset id (owner/name)",
        positional=True,
        metavar="FILE",
        ui=False,
    )
    base: str = option("embedded", help="whose tokenizer: 'embedded', a hub id or a local folder", ui=False)
    max_length: int = _trainer_option("max_length")
    format: str = _trainer_option("format")

    def __post_init__(self) -> None:
        # `studio data FILE` is `studio data check FILE`: a lone positional that is no action is the file.
        if self.action not in ACTIONS and self.file is None:
            self.action, self.file = "check", self.action
        if self.action not in ACTIONS:
            raise UserError(f"studio data: unknown action {self.action!r}; one of {', '.join(ACTIONS)}")


def sections() -> list[Section]:
    return [Section(None, DataCheckOptions)]


def percentile(sorted_values: list[int], q: float) -> int:
    """The nearest-rank percentile of ascending values."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def loss_spans(example, tokenizer) -> list[tuple[bool, str]]:
    """The example as (loss?, text) spans; the first token is never predicted, so never has a loss."""
    from studio.llm.data import IGNORE

    spans: list[tuple[bool, list[int]]] = []
    for index, (token, label) in enumerate(zip(example.input_ids, example.labels)):
        learned = index > 0 and label != IGNORE
        if spans and spans[-1][0] == learned:
            spans[-1][1].append(token)
        else:
            spans.append((learned, [token]))
    return [(learned, tokenizer.decode(ids, skip_special_tokens=False)) for learned, ids in spans]


def check(options: DataCheckOptions) -> tuple[list[str], bool]:
    """The report's lines, and whether every row is usable."""
    from studio.llm.data import IGNORE, encode_rows, fit_length, load_rows, problem_list
    from studio.llm.model import load_tokenizer

    if options.file is None:
        raise UserError("give the data to check: studio data check FILE")
    data = load_rows(options.file, options.format)
    lines = [f"{options.file}: {len(data.rows)} usable rows, format {data.describe_format()}"]
    if data.problems:
        lines.append(
            f"{len(data.problems)} malformed {data.unit}(s): {problem_list(data.problems)} "
            "(train-llm stops on them; --skip-bad-lines trains without them)"
        )
    if not data.rows:
        return lines, False
    tokenizer = load_tokenizer(argparse.Namespace(base=options.base))  # it reads only the base
    if data.format == "preference":
        return lines + preference_report(data.rows, tokenizer, options), not data.problems
    examples = encode_rows(data.rows, tokenizer, options.file)
    lengths = sorted(len(e.input_ids) for e in examples)
    lines.append(
        f"tokens per row ({options.base} tokenizer): p50 {percentile(lengths, 50)}, p90 {percentile(lengths, 90)}, "
        f"p99 {percentile(lengths, 99)}, max {lengths[-1]}"
    )
    kept, truncated, dropped = fit_length(examples, options.max_length)
    lines.append(
        f"max_length {options.max_length}: {truncated} row(s) would be truncated, {dropped} dropped "
        f"(no response token left), {len(kept)} train"
    )
    first = examples[0]
    learned = sum(label != IGNORE for label in first.labels[1:])
    lines.append(f"first example ({len(first.input_ids)} tokens, {learned} with loss):")
    for yes, text in loss_spans(first, tokenizer):
        lines.append(f"  loss: {'yes' if yes else 'no '} | {json.dumps(text, ensure_ascii=False)}")
    return lines, not data.problems


def preference_report(rows: list[dict], tokenizer, options: DataCheckOptions) -> list[str]:
    """Token lengths (the longer side of each pair), what max_length would cut, and the first pair's two
    sequences with their loss masks: what --objective dpo / orpo would train on."""
    from studio.llm.preference import encode_pair, tokenize_pairs

    first = encode_pair(rows[0], tokenizer)
    whole = tokenize_pairs(rows, tokenizer, 10**9, str(options.file))  # every pair, uncut (and row errors)
    lengths = sorted(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in whole.examples)
    lines = [
        f"tokens per pair, longer side ({options.base} tokenizer): p50 {percentile(lengths, 50)}, "
        f"p90 {percentile(lengths, 90)}, p99 {percentile(lengths, 99)}, max {lengths[-1]}"
    ]
    try:
        fitted = tokenize_pairs(rows, tokenizer, options.max_length, str(options.file))
        lines.append(
            f"max_length {options.max_length}: {fitted.truncated} pair(s) would be truncated, {fitted.dropped} "
            f"dropped (a side with no response token left), {len(fitted.examples)} train"
        )
    except UserError as error:
        lines.append(f"max_length {options.max_length}: {error}")
    for side, example in (("chosen", first.chosen), ("rejected", first.rejected)):
        lines.append(f"first pair, {side} ({len(example.input_ids)} tokens, {example.label_count} with loss):")
        for yes, text in loss_spans(example, tokenizer):
            lines.append(f"  loss: {'yes' if yes else 'no '} | {json.dumps(text, ensure_ascii=False)}")
    return lines


def run(args: argparse.Namespace) -> int:
    lines, clean = check(args.options[None])
    print("\n".join(lines))
    return 0 if clean else 1
