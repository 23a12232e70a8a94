"""Loss and evaluation: the causal-LM loss on response tokens (optionally chunked over the vocabulary),
loss / perplexity on held-out rows and multiple-choice accuracy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from pipelines.errors import UserError
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

# Config fields of models whose logits are not just lm_head(last hidden state) (Gemma 2, Cohere, ...).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


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
