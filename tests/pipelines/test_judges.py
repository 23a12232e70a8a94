"""The shipped judge reads real renders of the world correctly, and reads them after the tiny SD's
VAE too (as every generated picture is); scores are probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines.base import ASSETS
from pipelines.metrics import (
    content_score,
    label_accuracy,
    load_judge,
    prompt_matches,
    score,
    style_score,
    vae_round_trip,
)
from pipelines.world.image import Scene, concept_sets, render, render_stream, scene_rng


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(ASSETS / "tiny-sd" / "vae")


def test_judge_accuracy_on_heldout_renders(judge):
    images, scenes = render_stream("judge", seed=4242, count=300, size=64)
    accuracy = label_accuracy(judge, images, scenes)
    # Measured: content 0.976, the other heads 1.0 on 2000 renders (bench/results/embedded.json).
    assert accuracy["content"] >= 0.95
    assert accuracy["colour"] >= 0.95 and accuracy["style"] >= 0.95


def test_scores_are_probabilities_that_prefer_the_truth(judge):
    scene = Scene("star", "red", "striped", "blue")
    picture = render(scene, 64, scene_rng(0, 0))
    star, circle = content_score(judge, [picture], "star"), content_score(judge, [picture], "circle")
    assert 0 <= float(circle) < float(star) <= 1
    neon = render(Scene("star", "", "", "", "neon"), 64, scene_rng(0, 1))
    assert float(style_score(judge, [neon], "neon")) > 0.9
    assert prompt_matches(judge, [picture], [scene]) == [True]


def test_unknown_labels_are_named(judge):
    with pytest.raises(ValueError, match="knows"):
        score(judge, [render(Scene("star", "red", "plain", "blue"), 64, scene_rng(0, 0))], "content", "dragon")


@pytest.mark.parametrize("name", sorted(concept_sets()))
def test_shipped_sets_are_recognised_after_the_vae_round_trip(judge, vae, name):
    # A judge trained on renders alone scored neon, pixel and watercolor pictures 0.01-0.02 after
    # the round trip (the VAE shifts their colours), so it called every generated picture "not
    # neon". The shipped judge also learned from round trips: bench/results/embedded.json
    # (judge_mean_score_on_shipped_sets_after_vae) has the measured scores.
    spec, folder = concept_sets()[name], ASSETS / "sets" / name
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    pictures = np.stack([np.asarray(Image.open(folder / row["file_name"]).convert("RGB")) for row in rows])
    head = "content" if spec["kind"] == "content" else "style"
    assert float(score(judge, vae_round_trip(vae, pictures), head, spec["concept"]).mean()) > 0.5
