"""`studio demo`: the quickest real run of peft_core, on a CPU in well under a minute.

It pretrains a tiny causal transformer on one synthetic language (repeat a pattern), then adapts
it to a new one (reverse the pattern) with each method, and prints for each: trainable
parameters, loss before/after, and the checks users rely on (merged == unmerged, save -> load ->
same outputs). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.options import option
from studio.options import Section

VOCAB, PATTERN, CONTEXT = 16, 6, 13  # tokens; pattern length; 6 + separator + 6


class Block(nn.Module):
    """A pre-norm causal transformer block with Llama's projection names."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width) for _ in range(4))
        self.up_proj, self.down_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, t, width = h.shape
        x = self.norm1(h)
        q, k, v = (
            proj(x).view(n, t, self.heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (n, heads, t, width/heads)
        h = h + self.o_proj(attention.transpose(1, 2).reshape(n, t, width))
        return h + self.down_proj(F.gelu(self.up_proj(self.norm2(h))))


class TinyTransformer(nn.Module):
    def __init__(self, width: int = 48, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(CONTEXT, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.lm_head = nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.lm_head(h)


def batch(task: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences "p SEP f(p)" where f is identity ("copy") or reversal ("reverse")."""
    pattern = torch.randint(1, VOCAB, (size, PATTERN), generator=generator)
    answer = pattern if task == "copy" else pattern.flip(1)
    return torch.cat([pattern, torch.zeros(size, 1, dtype=torch.long), answer], dim=1)


def answer_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])[:, PATTERN:]  # predict only the answer half
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, PATTERN + 1 :].reshape(-1))


def train(model: nn.Module, parameters, task: str, steps: int, lr: float, seed: int, on_step=None) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    if on_step:
        on_step(optimizer)
    for _ in range(steps):
        loss = answer_loss(model, batch(task, 64, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@dataclass
class DemoOptions:
    steps: int = option(150, help="adaptation steps per method", min=1)
    seed: int = option(0, help="seed of the data and the initialisation", min=0, max=2**32 - 1)


def sections() -> list[Section]:
    return [Section(None, DemoOptions)]


def run(args: argparse.Namespace) -> int:
    from peft_core import LoraConfig, PacaConfig, attach, load

    torch.manual_seed(args.seed)
    evaluation = batch("reverse", 512, torch.Generator().manual_seed(10_000 + args.seed))
    print("pretraining a tiny transformer on the 'copy' language ...", flush=True)
    base = TinyTransformer()
    train(base, base.parameters(), "copy", steps=200, lr=3e-3, seed=args.seed)
    with torch.no_grad():
        print(f"  base model, 'reverse' loss before adapting: {answer_loss(base, evaluation):.3f}")

    targets = ["all-linear"]  # every projection; the output head is skipped
    methods = {
        "lora r=8": (LoraConfig(targets=targets, r=8, alpha=16.0), 3e-3),
        "paca r=16": (PacaConfig(targets=targets, r=16, alpha=16.0), 1e-2),  # PaCA wants its own LR (spec §1.3)
    }
    print(f"\n{'method':<12}{'trainable':>11}{'loss after':>12}{'merge err':>12}{'reload err':>12}{'seconds':>9}")
    for label, (config, lr) in methods.items():
        model = TinyTransformer()
        model.load_state_dict(base.state_dict())
        started = time.perf_counter()
        handle = attach(model, config)
        train(model, handle.trainable_parameters(), "reverse", args.steps, lr, args.seed, handle.track_optimizer)
        model.eval()
        with torch.no_grad():
            loss = answer_loss(model, evaluation).item()
            logits = model(evaluation[:, :-1])
            handle.merge()
            merge_error = (model(evaluation[:, :-1]) - logits).abs().max().item()
            handle.unmerge()
            with tempfile.TemporaryDirectory() as folder:
                handle.save(folder)
                fresh = TinyTransformer()
                fresh.load_state_dict(base.state_dict())
                load(fresh, folder)
                fresh.eval()
                reload_error = (fresh(evaluation[:, :-1]) - logits).abs().max().item()
        trainable = handle.parameter_count("default")
        print(
            f"{label:<12}{trainable:>11,}{loss:>12.3f}{merge_error:>12.1e}{reload_error:>12.1e}"
            f"{time.perf_counter() - started:>9.1f}"
        )
    return 0
