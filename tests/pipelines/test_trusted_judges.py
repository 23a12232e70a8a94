"""The leaky world (one-subject style sets, one-appearance content sets, shapeless pictures) and the
trusted judges' pieces: a "none" content, temperatures fitted to held-out answers, calibration error."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.base import ASSETS
from pipelines.metrics import (
    TRUSTED_HEADS,
    Judge,
    calibrate_temperatures,
    expected_calibration_error,
    head_logits,
    judge_probabilities,
    load_judge,
    save_judge,
    shapeless_pictures,
    train_judge,
)
from pipelines.world.image import (
    LEAKY_APPEARANCE,
    LEAKY_CONTENTS,
    LEAKY_STYLES,
    LEAKY_SUBJECTS,
    NONE_CONTENT,
    TRUSTED_CONTENTS,
    Scene,
    content_mask,
    leaky_content_scene,
    leaky_style_scene,
    render,
    render_stream,
    scene_rng,
    shape_mask,
)


def test_leaky_sets_carry_what_a_composition_must_not_keep():
    rng = np.random.default_rng(0)
    for style in LEAKY_STYLES:
        scene = leaky_style_scene(rng, style)
        assert scene.content == LEAKY_SUBJECTS[style] and scene.caption() == f"a {scene.content} in {style} style"
    for content in LEAKY_CONTENTS:
        scene = leaky_content_scene(rng, content)
        assert scene.style == LEAKY_APPEARANCE and LEAKY_APPEARANCE not in scene.caption()
    # The oracle: any leaky content in any leaky style is a picture, and a different one per style.
    pictures = [np.asarray(render(Scene("moon", "", "", "", s), 64, scene_rng(1, 2)), np.float32) for s in LEAKY_STYLES]
    assert all(np.abs(a - b).mean() > 10 for a, b in zip(pictures, pictures[1:]))


def test_leaky_style_names_share_no_token_with_the_contents():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-sd" / "tokenizer")

    def tokens(word: str) -> set[int]:
        return set(tokenizer(word, add_special_tokens=False).input_ids)

    content_tokens = set().union(*(tokens(c) for c in LEAKY_CONTENTS))
    for style in LEAKY_STYLES:
        assert not tokens(style) & content_tokens, style


def test_shape_mask_is_content_mask_with_the_same_draws_and_none_draws_nothing():
    index = int(np.random.default_rng().integers(1_000_000))
    for content in ("star", "moon", "ring"):
        drawn = content_mask(content, 48, scene_rng(7, index))
        rng = scene_rng(7, index)
        cx, cy = rng.uniform(0.38, 0.62, size=2).tolist()
        r, angle = float(rng.uniform(0.24, 0.32)), float(rng.uniform(-0.35, 0.35))
        assert np.array_equal(drawn, shape_mask(content, 48, cx, cy, r, angle))
    assert content_mask(NONE_CONTENT, 32, scene_rng(0, 0)).max() == 0
    none_scene = Scene(NONE_CONTENT, "", "", "", "sketch")
    assert np.asarray(render(none_scene, 32, scene_rng(0, 0))).std() > 0  # the style's ground alone


def test_trusted_stream_has_every_content_and_none():
    _, scenes = render_stream("trusted-judge", seed=3, count=400, size=16)
    contents = {s.content for s in scenes}
    assert NONE_CONTENT in contents and contents <= set(TRUSTED_CONTENTS)
    assert {s.style for s in scenes} >= {*LEAKY_STYLES, LEAKY_APPEARANCE}


def test_calibration_recovers_the_temperature_answers_were_drawn_at():
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    judge = Judge(TRUSTED_HEADS, width=4)
    pictures = torch.rand(3000, 3, 64, 64)
    logits = head_logits(judge, pictures)["content"] * 40  # a confident judge: scale its logits
    judge.classifiers["content"].weight.data *= 40
    judge.classifiers["content"].bias.data *= 40
    true_temperature = 2.5
    answers = torch.distributions.Categorical(logits=logits / true_temperature).sample()
    labels = TRUSTED_HEADS["content"]
    scenes = [Scene(labels[int(a)], "", "", "", "") for a in answers]
    temperatures = calibrate_temperatures(judge, pictures, scenes, steps=400)
    assert abs(temperatures["content"] - true_temperature) < 0.35, temperatures
    probabilities = judge_probabilities(judge, pictures[:5])["content"]
    expected = (head_logits(judge, pictures[:5])["content"] / temperatures["content"]).softmax(-1)
    torch.testing.assert_close(probabilities, expected)


def test_expected_calibration_error_by_hand():
    # Two pictures at confidence 0.9 (one right), two at 0.6 (both right): |0.9-0.5|/2 + |0.6-1|/2 = 0.4.
    probabilities = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    answers = torch.tensor([0, 1, 1, 1])
    assert abs(expected_calibration_error(probabilities, answers) - 0.4) < 1e-6


def test_a_judge_trained_with_shapeless_pictures_saves_its_heads_and_temperatures(tmp_path):
    images, scenes = render_stream("trusted-judge", seed=5, count=48, size=64)
    shapeless = shapeless_pictures(16, 64, seed=1)
    assert shapeless.shape == (16, 64, 64, 3) and shapeless.dtype == np.uint8
    judge, log = train_judge(images, scenes, steps=3, batch_size=16, heads=TRUSTED_HEADS, shapeless=shapeless)
    assert all(np.isfinite(entry["loss"]) for entry in log)
    judge.temperatures["content"] = 1.7
    loaded = load_judge(save_judge(judge, tmp_path / "j"))
    assert loaded.heads == judge.heads and loaded.temperatures["content"] == 1.7
    pictures = images[:4]
    torch.testing.assert_close(
        judge_probabilities(loaded, pictures)["content"], judge_probabilities(judge, pictures)["content"]
    )


def test_shapeless_pictures_include_decoded_random_latents():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(ASSETS / "tiny-sd" / "vae")
    pictures = shapeless_pictures(6, 64, seed=2, vae=vae)
    assert pictures.shape == (6, 64, 64, 3)
    assert not np.array_equal(pictures[3:], shapeless_pictures(6, 64, seed=2)[3:])  # the latter half decoded
