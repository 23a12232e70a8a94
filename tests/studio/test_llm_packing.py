"""Packing without cross-contamination: positions restart at every packed example and attention never
crosses examples (a block-diagonal causal mask, or FlashAttention's padding-free varlen row), so every
example of a packed batch has exactly the loss it has alone. Tiny random Llama in float64, on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from studio.llm.data import IGNORE, Example, collate, model_inputs, pack
from studio.llm.losses import token_loss_sum

VOCAB, PAD = 61, 0


def tiny_model(attn_implementation: str, family: str = "llama"):
    """A tiny random causal LM in float64: Llama (rotary positions) or GPT-2 (learned absolute positions,
    where a position that does not restart at an example changes its loss)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=1,
            attn_implementation=attn_implementation,
        )
        return GPT2LMHeadModel(config).double().eval()
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).double().eval()


def random_examples(lengths_and_prompts: list[tuple[int, int]], seed: int = 1) -> list[Example]:
    """Examples of the given lengths whose first `prompt` tokens carry no loss."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length, prompt in lengths_and_prompts:
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return examples


def token_losses(model, batch: dict, **extra) -> torch.Tensor:
    """(B, T-1) next-token cross-entropies, 0 where there is no label."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
    targets = batch["labels"][:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1], -1)
    return -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != IGNORE)


def segments_of(block: Example) -> list[Example]:
    """Each segment of a packed block as an example of its own (its labels as the block has them)."""
    out, start = [], 0
    for length in block.segments:
        out.append(Example(block.input_ids[start : start + length], block.labels[start : start + length]))
        start += length
    return out


def alone(model, example: Example) -> float:
    with torch.no_grad():
        return float(token_losses(model, collate([example], PAD)).sum())


def per_segment(losses: torch.Tensor, blocks: list[Example], flat: bool) -> list[float]:
    """Each segment's loss sum from a packed forward's token losses ((rows, width - 1); one row if flat)."""
    zero = torch.zeros(1, dtype=losses.dtype)
    if flat:
        stream = torch.cat([zero, losses[0]])  # token t's loss is at t - 1: a 0 for the first token
    else:
        stream = torch.cat([torch.cat([zero, row[: len(b.input_ids) - 1]]) for row, b in zip(losses, blocks)])
    out, start = [], 0
    for length in (n for b in blocks for n in b.segments):
        out.append(float(stream[start : start + length].sum()))
        start += length
    return out


def packed_losses(model, blocks: list[Example], attn_implementation: str) -> list[float]:
    """Each segment's loss sum, read from one packed forward (flattened as for FlashAttention, or masked)."""
    batch = model_inputs(collate(blocks, PAD), attn_implementation, torch.float64)
    with torch.no_grad():
        losses = token_losses(model, batch, position_ids=batch["position_ids"], use_cache=False)
    return per_segment(losses, blocks, flat=batch["attention_mask"] is None)


def test_pack_keeps_block_lengths_and_marks_segments():
    examples = random_examples([(6, 0)] * 5)
    blocks, split = pack(examples, 8)
    assert [len(b.input_ids) for b in blocks] == [8, 8, 8, 6] and split == 2  # 30 tokens, as before
    assert [b.segments for b in blocks] == [[6, 2], [4, 4], [2, 6], [6]]
    assert blocks[1].position_ids == [0, 1, 2, 3, 0, 1, 2, 3]
    # The first label of every segment is never learned: the token before it is another example's.
    for block in blocks:
        start = 0
        for length in block.segments:
            assert block.labels[start] == IGNORE
            start += length
    assert sum(b.label_count for b in blocks) == 30 - 7  # every token but the first of each of the 7 pieces
    batch = collate(blocks, PAD)
    assert batch["position_ids"][3].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]  # the padding is a segment of its own
    assert "position_ids" not in collate(examples, PAD)  # unpacked batches are unchanged


def test_model_inputs_are_block_diagonal_or_flattened():
    blocks, _ = pack(random_examples([(3, 0), (2, 0), (4, 0)]), 5)  # [3, 2], [4] + 1 padding
    batch = collate(blocks, PAD)
    sdpa = model_inputs(batch, "sdpa")["attention_mask"]
    expected = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    expected[0, 0, :3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()
    expected[0, 0, 3:, 3:] = torch.ones(2, 2, dtype=torch.bool).tril()
    expected[1, 0, :4, :4] = torch.ones(4, 4, dtype=torch.bool).tril()
    expected[1, 0, 4, 4] = True  # padding attends to itself only: no fully masked row
    assert torch.equal(sdpa, expected)
    eager = model_inputs(batch, "eager", torch.float32)["attention_mask"]
    assert eager.dtype == torch.float32 and torch.equal(eager == 0, expected)
    assert torch.all(eager[~expected] == torch.finfo(torch.float32).min)
    flat = model_inputs(batch, "flash_attention_2")
    assert flat["attention_mask"] is None and flat["input_ids"].shape == (1, 9)  # padding-free
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    unpacked = collate(random_examples([(3, 0)]), PAD)
    assert model_inputs(unpacked, "sdpa") is unpacked


# Lengths that fill 16-token blocks exactly (whole examples), then two blocks where one example is split.
WHOLE = [(5, 2), (7, 3), (4, 0), (9, 4), (7, 1), (3, 1), (6, 2), (2, 0)]
SPLIT = [(10, 3), (9, 2), (5, 1)]


@pytest.mark.parametrize(
    "family, attn_implementation",
    [("llama", "eager"), ("llama", "sdpa"), ("llama", "flash_attention_2"), ("gpt2", "sdpa"), ("gpt2", "eager")],
)
def test_packed_examples_have_exactly_their_unpacked_losses(family, attn_implementation):
    """flash_attention_2 here: FlashAttention's padding-free layout (one row, restarting position ids, no
    mask) run through SDPA, where transformers derives the same sequence boundaries from the positions."""
    model = tiny_model("sdpa" if attn_implementation.startswith("flash") else attn_implementation, family)
    examples = random_examples(WHOLE)
    blocks, split = pack(examples, 16)
    assert split == 0 and [b.segments for b in blocks] == [[5, 7, 4], [9, 7], [3, 6, 2]]
    reference = [alone(model, e) for e in examples]  # each example alone, unpacked
    got = packed_losses(model, blocks, attn_implementation)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(reference), rtol=1e-10, atol=1e-9)

    # A split example: each piece has the loss of that piece alone (it does not see the other piece).
    blocks, split = pack(random_examples(SPLIT, seed=2), 16)
    assert split == 1 and [b.segments for b in blocks] == [[10, 6], [3, 5]]
    pieces = [alone(model, piece) for block in blocks for piece in segments_of(block)]
    got = packed_losses(model, blocks, attn_implementation)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(pieces), rtol=1e-10, atol=1e-9)


def test_the_old_packing_leaks_across_examples():
    """By construction: the same blocks with a plain causal mask and running positions (the old packing)
    give every example after the first of its block a different loss."""
    model = tiny_model("sdpa")
    examples = random_examples(WHOLE)
    blocks, _ = pack(examples, 16)
    reference = [alone(model, e) for e in examples]
    batch = collate(blocks, PAD)
    with torch.no_grad():
        old = per_segment(token_losses(model, {k: v for k, v in batch.items() if k != "position_ids"}), blocks, False)
    first = {0, 3, 5}  # each block's first example: nothing before it to leak from
    for index, (old_loss, true_loss) in enumerate(zip(old, reference)):
        if index in first:
            assert old_loss == pytest.approx(true_loss, rel=1e-9)
        else:
            assert abs(old_loss - true_loss) > 1e-3, index


def test_the_trainers_step_feeds_packed_blocks_like_single_examples():
    """train.py's path (model_inputs + position ids through token_loss_sum, plain and chunked): the packed
    loss sum and its gradient equal the sum over the examples run one by one."""
    from studio.llm.train import _packed_inputs, _with_positions

    model = tiny_model("sdpa")
    examples = random_examples(WHOLE)
    blocks, _ = pack(examples, 16)
    for chunk in (0, 5):
        model.zero_grad()
        batch = _packed_inputs(model, collate(blocks, PAD))
        packed = token_loss_sum(_with_positions(model, batch), batch, chunk)
        packed.backward()
        packed_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        model.zero_grad()
        single = sum(token_loss_sum(model, collate([e], PAD), chunk) for e in examples)
        single.backward()
        torch.testing.assert_close(packed, single, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            packed_grad, model.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-8, atol=1e-12
        )


def test_train_llm_with_packing(tmp_path):
    from pipelines.base import embedded_lm_data
    from studio.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(embedded_lm_data("task_add_train.jsonl").read_text().splitlines()[:32]) + "\n")
    argv = [
        "train-llm",
        str(data),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--warmup-steps",
        "1",
        "--cpu",
        "--packing",
        "--max-length",
        "64",
        "--eval",
        str(embedded_lm_data("knowledge_probe.jsonl")),
    ]
    assert main(argv) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    events = [json.loads(line) for line in (run_dir / "logs" / "events.jsonl").read_text().splitlines()]
    assert "(packed into max_length 64 blocks" in next(e for e in events if e["kind"] == "data")["message"]
    losses = [e["loss"] for e in events if e["kind"] == "step"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
