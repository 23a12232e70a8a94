"""bench/composition.py's summary: the hierarchical bootstrap finds a real difference and no false one,
the recommendation needs both content and style intervals above zero, leakage is p_s + p_c - p_s p_c."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from composition import METHODS, bootstrap_vs_naive, picture_scores, summarize  # noqa: E402

from pipelines.metrics import TRUSTED_HEADS, Judge  # noqa: E402
from pipelines.world.image import LEAKY_APPEARANCE, LEAKY_SUBJECTS, leaky_sets, write_concept_set  # noqa: E402


def rows(shift: dict[str, dict[str, float]], pairs: int = 8, seeds: int = 3, pictures: int = 32) -> list[dict]:
    rng = np.random.default_rng()
    out = []
    for p in range(pairs):
        for s in range(seeds):
            scores = {}
            for method in METHODS:
                base = rng.uniform(0.3, 0.5)  # pairs differ; every method shares the pair's difficulty
                scores[method] = {
                    key: list(np.clip(base + shift.get(method, {}).get(key, 0.0) + rng.normal(0, 0.1, pictures), 0, 1))
                    for key in ("content", "style", "joint", "leakage")
                }
            out.append({"content": f"c{p}", "style": "s", "seed": s, "scores": scores})
    return out


def test_a_clearly_better_method_is_recommended_and_an_equal_one_is_not():
    better = {"b4m": {"content": 0.2, "style": 0.2, "joint": 0.2}, "oracle": {"content": 0.4, "style": 0.4}}
    summary = summarize(rows(better))
    assert summary["ci_vs_naive"]["b4m"]["content"][0] > 0 and summary["ci_vs_naive"]["b4m"]["style"][0] > 0
    assert summary["ci_vs_naive"]["ziplora"]["content"][0] < 0 < summary["ci_vs_naive"]["ziplora"]["content"][1]
    assert summary["recommended"] == "b4m"
    assert summary["headroom"]["shown"]  # the oracle is 0.4 above the naive sum
    only_content = {"ziplora": {"content": 0.3}}
    assert summarize(rows(only_content))["recommended"] == "naive_sum"  # style not better: not recommended


def test_bootstrap_interval_covers_the_true_difference():
    data = rows({"b4m": {"style": 0.1}})
    low, high = bootstrap_vs_naive(data, "b4m", "style", draws=500)
    assert low < 0.1 < high and low > 0


def test_picture_scores_leakage_is_the_probability_of_either_leak():
    judge = Judge(TRUSTED_HEADS, width=4)
    pictures = torch.rand(3, 3, 64, 64)
    scores = picture_scores(judge, pictures, "moon", "sketch")
    from pipelines.metrics import judge_probabilities

    probabilities = judge_probabilities(judge, pictures)
    subject = probabilities["content"][:, TRUSTED_HEADS["content"].index(LEAKY_SUBJECTS["sketch"])]
    clay = probabilities["style"][:, TRUSTED_HEADS["style"].index(LEAKY_APPEARANCE)]
    torch.testing.assert_close(torch.tensor(scores["leakage"]), subject + clay - subject * clay)


def test_leaky_sets_are_written_with_their_captions(tmp_path):
    import json

    for name in ("leaky-content-moon", "leaky-style-tweed"):
        assert name in leaky_sets()
        folder = write_concept_set(tmp_path / name, name, count=3, seed=0, size=32)
        captions = [json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()]
        assert captions == (["a moon"] * 3 if "moon" in name else ["a star in tweed style"] * 3)
