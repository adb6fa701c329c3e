import json
import math

import pytest

from latent_mca.eval.metrics import judge_score_ratio
from latent_mca.rl.rewards.base import PairScores

ASPECTS = ("x", "y")


def ps(a, b):
    return PairScores(ASPECTS, tuple(a), tuple(b))


def table():
    # Hand values (eps = 1e-6 ignored, far below the tolerance):
    #   g0: s1 -> (8/8 + 6/3)/2 = 1.5, s2 -> (4/8 + 4/8)/2 = 0.5, s3 unscored  => R0 = 1.0
    #   g1: s1 -> 1.0, s2 unscored, s3 -> (6/3 + 2/4)/2 = 1.25                  => R1 = 1.125
    return {
        ("s1", 0): ps((8, 6), (8, 3)), ("s2", 0): ps((4, 4), (8, 8)), ("s3", 0): None,
        ("s1", 1): ps((9, 9), (9, 9)), ("s2", 1): None, ("s3", 1): ps((6, 2), (3, 4)),
    }


def test_ratio_excludes_and_counts_failed_judgements():
    report = judge_score_ratio(table())
    assert report.generations == (0, 1)
    assert report.per_generation == pytest.approx((1.0, 1.125), rel=1e-5)
    assert report.mean == pytest.approx(1.0625, rel=1e-5)
    assert report.std == pytest.approx(0.125 / math.sqrt(2), rel=1e-4)
    assert report.scored_per_generation == (2, 2)
    assert report.excluded_per_generation == (1, 1)
    assert report.num_excluded == 2
    assert report.num_judgements == 6
    assert report.num_samples == 3
    assert report.num_generations == 2
    assert report.empty_generations == ()


def test_per_aspect_means():
    report = judge_score_ratio(table())
    assert report.aspects == ASPECTS
    assert report.aspect_a == pytest.approx({"x": (6 + 7.5) / 2, "y": (5 + 5.5) / 2})
    assert report.aspect_b == pytest.approx({"x": (8 + 6) / 2, "y": (5.5 + 6.5) / 2})
    assert report.aspect_ratio == pytest.approx({"x": (0.75 + 1.5) / 2, "y": (1.25 + 0.75) / 2}, rel=1e-5)
    # consistent reduction: the mean over aspects equals the headline number
    assert sum(report.aspect_ratio.values()) / 2 == pytest.approx(report.mean)


def test_mean_of_ratios_not_ratio_of_sums():
    report = judge_score_ratio({("s", 0): ps((8, 6), (8, 3))})
    assert report.mean == pytest.approx(1.5, rel=1e-5)  # ratio of sums would be 14 / 11


def test_single_generation_has_nan_std():
    report = judge_score_ratio({("a", 0): ps((5, 5), (10, 10)), ("b", 0): ps((10, 10), (10, 10))})
    assert report.mean == pytest.approx(0.75, rel=1e-5)
    assert math.isnan(report.std)


def test_three_generations_std():
    scores = {("a", g): ps((v, v), (10, 10)) for g, v in enumerate((8, 9, 10))}
    report = judge_score_ratio(scores)
    assert report.mean == pytest.approx(0.9, rel=1e-5)
    assert report.std == pytest.approx(0.1, rel=1e-4)  # stdev of 0.8, 0.9, 1.0


def test_generation_without_scores_is_reported_not_zero():
    scores = {("a", 0): ps((5, 5), (10, 10)), ("a", 1): None, ("b", 1): None}
    report = judge_score_ratio(scores)
    assert report.empty_generations == (1,)
    assert math.isnan(report.per_generation[1])
    assert report.mean == pytest.approx(0.5, rel=1e-5)
    assert report.num_generations == 1
    assert report.num_excluded == 2


def test_nothing_scored():
    report = judge_score_ratio({("a", 0): None})
    assert math.isnan(report.mean) and report.aspects == () and report.num_excluded == 1


def test_mismatched_aspects_raise_with_key():
    scores = {("a", 0): ps((1, 1), (1, 1)), ("b", 0): PairScores(("x", "z"), (1, 1), (1, 1))}
    with pytest.raises(ValueError, match="'b'"):
        judge_score_ratio(scores)


def test_bad_key_and_value():
    with pytest.raises(ValueError, match="generation index"):
        judge_score_ratio({"a": None})
    with pytest.raises(TypeError, match="'a'"):
        judge_score_ratio({("a", 0): 0.9})


def test_to_dict_is_json():
    d = judge_score_ratio(table()).to_dict()
    back = json.loads(json.dumps(d))
    assert back["mean"] == pytest.approx(1.0625, rel=1e-5)
    assert back["per_generation"] == pytest.approx([1.0, 1.125], rel=1e-5)
    assert back["num_generations"] == 2 and back["num_excluded"] == 2
