"""The shipped tiny SD follows prompts: judged content and colour match on held-out compositions."""

from __future__ import annotations

import pytest
import torch

from pipelines import load_base
from pipelines.metrics import load_judge, prompt_matches
from pipelines.world.image import Scene, heldout_prompt_scenes

# Measured on this fixed set (24 held-out prompts spread over all 8 shapes, seed 0, 20 DPM-Solver++ steps,
# guidance 5): 0.875 (21/24); the 64-prompt benchmark gives 0.84. The threshold leaves room for other
# CPUs' rounding, which changes a few samples.
PROMPTS = 24
MEASURED = 0.875
THRESHOLD = 0.65


def test_generations_follow_heldout_prompts():
    pipeline = load_base("embedded")
    pipeline.set_progress_bar_config(disable=True)
    scenes = heldout_prompt_scenes(PROMPTS)
    pictures = pipeline(
        [s.caption() for s in scenes],
        num_inference_steps=20,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    ).images
    matches = prompt_matches(load_judge(), pictures, scenes)
    accuracy = sum(matches) / len(matches)
    assert accuracy >= THRESHOLD, f"judged prompt accuracy {accuracy:.2f} (measured {MEASURED} when shipped)"


@pytest.mark.parametrize(
    "prompt, scene",
    [
        ("a green circle", Scene("circle", "green", "", "")),
        ("a red star", Scene("star", "red", "", "")),
    ],
)
def test_short_prompts_are_followed(prompt, scene):
    # Measured: 7/8 green circles and 6/8 red stars are judged right (the two others are deformed stars,
    # read as heart and cross; the render-only judge before read 8/8 but unsure of those two). The
    # threshold leaves one picture of room for other CPUs' rounding.
    pipeline = load_base("embedded")
    pipeline.set_progress_bar_config(disable=True)
    pictures = pipeline(
        [prompt] * 8, num_inference_steps=20, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)
    ).images
    assert sum(prompt_matches(load_judge(), pictures, [scene] * 8)) >= 5
