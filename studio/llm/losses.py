"""The causal-LM loss on response tokens: whole, or chunked over positions so the (tokens x vocab)
logits never exist at once. Shared by supervised training, evaluation and preference tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from pipelines.errors import UserError
from studio.llm.data import IGNORE

# Config fields of models whose logits are not just lm_head(last hidden state) (Gemma 2, Cohere, ...).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def token_loss_sum(model, batch: dict[str, torch.Tensor], chunk_tokens: int = 0) -> torch.Tensor:
    """Sum over response tokens of the next-token cross-entropy (float32).

    chunk_tokens > 0: never hold the whole (tokens x vocab) logits (chunked_token_loss_sum); the
    model must be the bare Hugging Face model (not wrapped for DDP) with a plain linear output layer.
    """
    if chunk_tokens > 0:
        head = plain_output_layer(model)
        hidden = model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        return chunked_token_loss_sum(hidden[:, :-1], head, batch["labels"][:, 1:], chunk_tokens)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, targets = logits[:, :-1], batch["labels"][:, 1:]  # (B, T-1, V), (B, T-1)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def plain_output_layer(model) -> torch.nn.Linear:
    """The model's output layer, where its logits are exactly that layer of the last hidden state (what the
    chunked loss computes); else a UserError."""
    head, config = model.get_output_embeddings(), model.config
    if not isinstance(head, torch.nn.Linear) or any(getattr(config, key, None) for key in LOGIT_TRANSFORMS):
        raise UserError(
            f"loss_chunk_tokens: {type(model).__name__} does not compute its logits as a plain linear layer "
            "of the last hidden state (output layer or logit scaling/soft-capping): set loss_chunk_tokens=0"
        )
    return head


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
