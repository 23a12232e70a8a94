"""Preference tuning: DPO and ORPO on pairs of responses to one prompt (`--objective dpo|orpo`).

    studio train-llm pairs.jsonl --objective dpo --dpo-beta 0.1
    studio train-llm pairs.jsonl --objective orpo --orpo-lambda 0.1
    studio train-llm --objective dpo        # the embedded demo: preference_add_train.jsonl

Rows are the "preference" format of studio.llm.data: {"prompt", "chosen", "rejected"} as strings, or as
message lists (TRL's conversational form; without "prompt", the prompt is the messages both conversations
start with). Each pair becomes two Examples, prompt + chosen and prompt + rejected, labelled on the
response tokens only (with the template's end-of-turn tokens, as SFT labels a response; EOS after a
plain-text response). A micro-batch of B pairs is one forward of 2B sequences (chosen first), so DDP sees
one forward per backward.

    log pi(y|x) = sum over y's response tokens t of log softmax(logits at t-1)[y_t]

DPO (Rafailov et al. 2023), per pair, w the chosen and l the rejected response:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

where ref is the same model with the adapter disabled (`AdapterHandle.disable`: no second copy of the
weights), run in eval mode under no_grad, before the policy's forward of the same batch.

ORPO (Hong et al. 2024), per pair, no reference model:

    loss = NLL(y_w) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l))
    NLL(y)      = -(1/|y|) log pi(y|x)                 the mean token NLL of the response (the paper's L_SFT)
    log odds(y) = log p - log(1 - p),  p = exp((1/|y|) log pi(y|x))   the length-normalised probability

The step's loss is the mean over the pairs of the whole global step (every micro-batch, every process):
each process backpropagates its sum times (processes / global pairs), as the SFT loss does with tokens,
so one process with batch 2B and two with batch B compute the same gradient.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.errors import UserError
from studio.llm.data import IGNORE, Example, collate, encode_row, preference_side, read_data
from studio.llm.losses import chunked_token_loss_sum, plain_output_layer

PREFERENCE_OBJECTIVES = ("dpo", "orpo")


@dataclass
class PreferencePair:
    chosen: Example  # prompt + chosen response, labels on the response
    rejected: Example  # prompt + rejected response, labels on the response


@dataclass
class PreferenceData:
    examples: list[PreferencePair]  # named like TokenizedData's: what StepSampler indexes
    rows: int
    truncated: int = 0  # pairs with a side longer than max_length (cut)
    dropped: int = 0  # pairs with a side left without a response token after the cut
    format: str = "preference"

    def summary(self, path: Path | str, max_length: int) -> str:
        text = f"{path}: {self.rows} rows ({self.format}) -> {len(self.examples)} preference pairs"
        if self.truncated:
            text += f"; {self.truncated} with a side longer than max_length {max_length} were truncated"
        if self.dropped:
            text += f"; {self.dropped} dropped (a side with no response token left after truncation)"
        return text


def check_objective(train) -> None:
    """What the preference objectives cannot combine with (their data is checked where it is read)."""
    if train.objective in PREFERENCE_OBJECTIVES and train.packing:
        raise UserError(
            f"--objective {train.objective} scores every response as a sequence of its own: --packing (which "
            "concatenates SFT rows into blocks) does not apply; drop it"
        )


def encode_pair(row: dict, tokenizer) -> PreferencePair:
    """Both sides of an internal preference row, each labelled on its response only."""
    chosen, first_turn = preference_side(row, "chosen")
    rejected, _ = preference_side(row, "rejected")
    return PreferencePair(encode_row(chosen, tokenizer, first_turn), encode_row(rejected, tokenizer, first_turn))


def _cut(example: Example, max_length: int) -> Example:
    return Example(example.input_ids[:max_length], example.labels[:max_length])


def tokenize_pairs(rows: list[dict], tokenizer, max_length: int, source: str = "data") -> PreferenceData:
    """Every preference row as a pair; a side longer than max_length is cut (the pair counted), and a pair
    whose cut leaves a side without a response token is dropped (counted)."""
    data = PreferenceData([], len(rows))
    for index, row in enumerate(rows):
        try:
            pair = encode_pair(row, tokenizer)
        except UserError as error:
            raise UserError(f"{source}: row {index + 1}: {error}") from None
        except Exception as error:  # a chat template may reject a conversation
            raise UserError(f"{source}: row {index + 1} cannot be rendered with the chat template: {error}") from None
        if max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) > max_length:
            data.truncated += 1
            pair = PreferencePair(_cut(pair.chosen, max_length), _cut(pair.rejected, max_length))
        if pair.chosen.label_count == 0 or pair.rejected.label_count == 0:
            data.dropped += 1
            continue
        data.examples.append(pair)
    if not data.examples:
        raise UserError(
            f"{source}: no preference pair has response tokens on both sides within max_length {max_length}"
        )
    return data


def read_preference_data(source: str | os.PathLike, train, tokenizer) -> PreferenceData:
    """The training pairs of a preference objective; a file of another format is a UserError saying so."""
    rows = read_data(source, train.skip_bad_lines, data_format=train.format)
    if rows.format != "preference":
        raise UserError(
            f'--objective {train.objective} trains on preference rows ({{"prompt", "chosen", "rejected"}}, '
            f"docs/llm.md), but {source} holds {rows.describe_format()} rows"
        )
    return tokenize_pairs(rows.rows, tokenizer, train.max_length, str(source))


def default_preference_data() -> tuple[Path, list[Path]]:
    """The embedded demo's pairs (the addition task, right sum chosen, a nearby wrong one rejected), evaluated
    on the held-out pairs, the task's test set and the knowledge probe."""
    from pipelines.base import embedded_lm_data

    return embedded_lm_data("preference_add_train.jsonl"), [
        embedded_lm_data("preference_add_test.jsonl"),
        embedded_lm_data("task_add_test.jsonl"),
        embedded_lm_data("knowledge_probe.jsonl"),
    ]


# ---------------------------------------------------------------------------------------------------
# Log-probabilities and the losses.


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B sequences: the B chosen sides, then the B rejected ones."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def response_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) how many response tokens each sequence has (predicted after the causal shift)."""
    return (batch["labels"][:, 1:] != IGNORE).sum(-1)


def sequence_logps(model, batch: dict[str, torch.Tensor], chunk_tokens: int = 0) -> torch.Tensor:
    """(2B,) sum over each sequence's response tokens of log pi(token | before), at least float32.

    chunk_tokens > 0: the output layer runs a few tokens at a time per sequence, recomputed in backward
    (studio.llm.losses.chunked_token_loss_sum); `model` must then be the bare Hugging Face model."""
    labels = batch["labels"][:, 1:]
    if chunk_tokens > 0:
        head = plain_output_layer(model)
        hidden = model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state[:, :-1]
        return -torch.stack(
            [chunked_token_loss_sum(hidden[i], head, labels[i], chunk_tokens) for i in range(hidden.shape[0])]
        )
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return -nll.view(labels.shape).sum(-1)


@torch.no_grad()
def reference_logps(model, handle, adapter_name: str, batch: dict[str, torch.Tensor], chunk_tokens: int = 0):
    """sequence_logps of the reference model: `model` with adapter `adapter_name` disabled, in eval mode
    (no dropout), without gradients; the adapter and the mode are restored afterwards."""
    was_training = model.training
    model.eval()
    handle.disable(adapter_name)
    try:
        return sequence_logps(model, batch, chunk_tokens)
    finally:
        handle.enable(adapter_name)
        model.train(was_training)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (x = 0 is moved just below)."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """(B,) per-pair DPO losses from (2B,) summed response log-probs (chosen first) of policy and reference."""
    half = policy.shape[0] // 2
    chosen_ratio = policy[:half] - reference[:half]
    rejected_ratio = policy[half:] - reference[half:]
    return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))


def orpo_losses(policy: torch.Tensor, counts: torch.Tensor, lam: float) -> torch.Tensor:
    """(B,) per-pair ORPO losses from (2B,) summed response log-probs (chosen first) and token counts."""
    half = policy.shape[0] // 2
    mean = policy / counts.to(policy.dtype)  # length-normalised log p
    chosen, rejected = mean[:half], mean[half:]
    log_odds = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    return -chosen + lam * -F.logsigmoid(log_odds)


def preference_loss_sum(model, bare_model, handle, adapter_name: str, batch: dict[str, torch.Tensor], train):
    """Sum over the batch's pairs of the objective's loss (train.objective: dpo or orpo).

    `model` runs the policy (the DDP wrapper with several processes), `bare_model` is the same model
    unwrapped (the reference pass, and the chunked loss, bypass the wrapper)."""
    chunk = train.loss_chunk_tokens
    if train.objective == "dpo":
        reference = reference_logps(bare_model, handle, adapter_name, batch, chunk)
        policy = sequence_logps(bare_model if chunk else model, batch, chunk)
        return dpo_losses(policy, reference, train.dpo_beta).sum()
    if train.objective == "orpo":
        policy = sequence_logps(bare_model if chunk else model, batch, chunk)
        return orpo_losses(policy, response_counts(batch), train.orpo_lambda).sum()
    raise ValueError(f"not a preference objective: {train.objective!r}")


@torch.no_grad()
def preference_accuracy(model, pairs: list[PreferencePair], pad_id: int, batch_size: int, device) -> dict[str, float]:
    """{"preference_accuracy": share of pairs whose chosen response is more likely than the rejected one
    (summed response log-probs; a tie is not a win), "preference_margin": the mean log-prob difference}."""
    wins, margin = 0, 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        logps = sequence_logps(model, batch)
        difference = logps[: len(chunk)] - logps[len(chunk) :]
        wins += int((difference > 0).sum())
        margin += float(difference.sum())
    return {"preference_accuracy": wins / len(pairs), "preference_margin": margin / len(pairs)}
