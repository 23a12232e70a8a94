"""The procedural image world: deterministic, held-out compositions really held out, every concept drawable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.world import image as world


def test_streams_are_deterministic_and_seed_dependent():
    first, scenes = world.render_stream("pretraining", seed=3, count=24, size=64)
    again, scenes_again = world.render_stream("pretraining", seed=3, count=24, size=64)
    other, _ = world.render_stream("pretraining", seed=4, count=24, size=64)
    assert first.shape == (24, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and scenes == scenes_again
    assert not np.array_equal(first, other)


def test_a_picture_depends_only_on_its_index():
    # Parallel rendering splits the stream in chunks; chunk boundaries must not change any picture.
    whole, _ = world.render_stream("judge", seed=1, count=10, size=32)
    tail, _ = world.render_stream("judge", seed=1, count=4, size=32, start=6)
    assert np.array_equal(whole[6:], tail)


def test_pretraining_never_shows_heldout_compositions_or_novel_concepts():
    heldout = {s.caption() for s in world.heldout_prompt_scenes(64)}
    assert len(heldout) == 64
    for scene, _ in world.sample_stream("pretraining", seed=0, count=3000):
        assert scene.content in world.SHAPES and scene.style == world.FLAT_STYLE
        assert not world._is_heldout(scene.content, scene.colour, scene.pattern, scene.background)
        assert scene.caption() not in heldout


def test_heldout_prompts_cover_every_shape_and_colour():
    scenes = world.heldout_prompt_scenes(64)
    assert {s.content for s in scenes} == set(world.SHAPES)
    assert {s.colour for s in scenes} == set(world.COLOURS)


@pytest.mark.parametrize("content", world.ALL_CONTENTS)
def test_every_content_draws_a_visible_mask(content):
    mask = world.content_mask(content, 64, world.scene_rng(0, 0))
    assert 0.04 < mask.mean() < 0.5


@pytest.mark.parametrize("style", world.ALL_STYLES)
def test_every_style_renders_and_captions(style):
    rng = world.scene_rng(0, 1)
    scene = world.style_scene(rng, style) if style != world.FLAT_STYLE else world.pretraining_scene(rng)
    picture = world.render(scene, 64, rng)
    assert picture.size == (64, 64) and picture.mode == "RGB"
    assert scene.caption().startswith(("a ", "an "))


def test_captions_read_naturally():
    assert world.Scene("star", "red", "striped", "blue").caption() == "a red star on a striped blue background"
    assert world.Scene("circle", "orange", "plain", "white", short_caption=True).caption() == "an orange circle"
    assert world.Scene("arrow", "", "", "", "neon").caption() == "an arrow in neon style"


def test_concept_sets_are_reproducible(tmp_path):
    sets = world.concept_sets()
    assert sum(spec["role"] == "auxiliary" and spec["kind"] == "content" for spec in sets.values()) >= 3
    assert sum(spec["role"] == "auxiliary" and spec["kind"] == "style" for spec in sets.values()) >= 3
    a = world.write_concept_set(tmp_path / "a", "style-neon", count=3, seed=0)
    b = world.write_concept_set(tmp_path / "b", "style-neon", count=3, seed=0)
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert all(row["text"].endswith("in neon style") for row in rows)
    assert (a / rows[0]["file_name"]).read_bytes() == (b / rows[0]["file_name"]).read_bytes()


def test_shipped_sets_match_the_recipe():
    from pipelines.base import ASSETS

    for name, spec in world.concept_sets().items():
        rows = [json.loads(line) for line in (ASSETS / "sets" / name / "metadata.jsonl").read_text().splitlines()]
        assert len(rows) >= 8
        key = "content" if spec["kind"] == "content" else "style"
        assert all(row[key] == spec["concept"] for row in rows)
        assert all((ASSETS / "sets" / name / row["file_name"]).is_file() for row in rows)
