"""The shipped tiny LM learned its world: held-out perplexity far below a random init, facts recalled."""

from __future__ import annotations

import json

import torch

from pipelines import load_embedded_lm
from pipelines.base import embedded_lm_data
from pipelines.world import text as world


def test_heldout_perplexity_is_far_below_random_init():
    model, tokenizer = load_embedded_lm()
    heldout = embedded_lm_data("heldout.txt").read_text().splitlines()[:100]
    torch.manual_seed(0)
    random_model = type(model)(model.config)
    trained, random = world.perplexity(model, tokenizer, heldout), world.perplexity(random_model, tokenizer, heldout)
    assert trained * 5 <= random, (trained, random)


def test_knowledge_probe_is_answered():
    model, tokenizer = load_embedded_lm()
    probe = [json.loads(line) for line in embedded_lm_data("knowledge_probe.jsonl").read_text().splitlines()]
    assert world.multiple_choice_accuracy(model, tokenizer, probe) >= 0.9


def test_shipped_data_files_match_the_generators():
    rows = [json.loads(line) for line in embedded_lm_data("task_add_test.jsonl").read_text().splitlines()]
    assert rows == world.addition_task("test", len(rows))
