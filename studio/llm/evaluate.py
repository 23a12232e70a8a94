"""Evaluation on held-out sets: loss / perplexity on response tokens, multiple-choice accuracy and
preference accuracy (the loss itself lives in studio.llm.losses)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.llm.config import LlmTrainConfig
from studio.llm.data import (
    IGNORE,
    Example,
    collate,
    common_prefix,
    read_jsonl,
    render_chat,
    row_messages,
    token_ids,
    tokenize,
)
from studio.llm.losses import token_loss_sum


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
    messages = [m for m in row_messages(row) if m["role"] != "assistant"] if "instruction" in row else row["messages"]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def _continuations(prompt: str, choices: list[str], tokenizer) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and each choice's continuation ids (the tokens after the prompt's)."""
    prompt_ids = token_ids(tokenizer, prompt)
    joiner = "" if not prompt or prompt[-1].isspace() else " "
    continuations = []
    for choice in choices:
        full = token_ids(tokenizer, prompt + joiner + choice)
        shared = common_prefix(prompt_ids, full)
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
    pairs: list = field(default_factory=list)  # preference rows as PreferencePairs (preference accuracy)


def load_eval_set(path: Path, tokenizer, train: LlmTrainConfig) -> EvalSet:
    rows = read_jsonl(path, train.skip_bad_lines, for_training=False)
    trainable = [
        r
        for r in rows
        if "text" in r or "response" in r or any(m.get("role") == "assistant" for m in r.get("messages", []))
    ]
    examples = tokenize(trainable, tokenizer, train.max_length, source=str(path)).examples if trainable else []
    preference = [r for r in rows if "chosen" in r]
    pairs = []
    if preference:
        from studio.llm.preference import tokenize_pairs

        pairs = tokenize_pairs(preference, tokenizer, train.max_length, source=str(path)).examples
    return EvalSet(path.stem, rows, examples, [r for r in rows if "choices" in r], pairs)


def evaluate(model, eval_sets: list[EvalSet], tokenizer, batch_size: int, device) -> dict[str, float]:
    """{"<set>/loss", "<set>/perplexity", "<set>/accuracy", "<set>/preference_accuracy",
    "<set>/preference_margin"} for every held-out set (each where it has such rows)."""
    from studio.llm.preference import preference_accuracy

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
        if eval_set.pairs:
            for key, value in preference_accuracy(
                model, eval_set.pairs, tokenizer.pad_token_id, batch_size, device
            ).items():
                metrics[f"{eval_set.name}/{key}"] = value
    model.train(was_training)
    return metrics
