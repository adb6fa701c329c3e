"""The synthetic world's rule-based judge as a reward plug-in."""

from __future__ import annotations

import math

import pytest

from latent_mca.rl.rewards import JudgeReward, RewardInput, WorldJudge, world_reward
from latent_mca.world.content import CHARACTER_POOL, Scene, make_facts
from latent_mca.world.judge import ASPECTS

CAST = list(CHARACTER_POOL[:4])
SCENE = Scene("red", "circle", "top left")


def sample(question_type="describe", completion=None, facts="default", reference=None, key="s0"):
    char = CAST[0]
    ref = char.reply(question_type, SCENE, 0, 0) if reference is None else reference
    metadata = {} if facts is None else {"facts": make_facts(char, SCENE, question_type, CAST) if facts == "default"
                                         else facts}
    return RewardInput(prompt=[{"role": "user", "content": "What do you see?"}],
                       completion=ref if completion is None else completion, reference=ref, metadata=metadata,
                       key=key)


@pytest.mark.parametrize("reduce", ["ratio_of_sums", "mean_of_ratios"])
def test_reference_against_itself_scores_one(reduce):
    rewards = world_reward(reduce)([sample(q) for q in ("colour", "shape", "position", "describe")])
    assert rewards == pytest.approx([1.0] * 4, abs=1e-5)


def test_wrong_colour_scores_below_one_and_aspects_are_in_order():
    good = sample("colour")
    wrong = sample("colour", completion=good.reference.replace("red", "blue"))
    assert "blue" in wrong.completion
    judge = WorldJudge()
    right_scores, wrong_scores = judge.score([good, wrong])
    assert right_scores.aspects == ASPECTS
    relevance = ASPECTS.index("Image-Text Relevance")
    assert wrong_scores.a[relevance] < wrong_scores.b[relevance]
    assert wrong_scores.b == right_scores.b  # B is the same reference in both
    for reduce in ("ratio_of_sums", "mean_of_ratios"):
        assert world_reward(reduce)([wrong])[0] < 1.0


def test_unscorable_inputs_get_nan_and_are_counted():
    reward = world_reward()
    batch = [
        sample(key="ok"),
        sample(facts=None, key="no-facts"),
        sample(facts="not a dict", key="string-facts"),
        sample(facts={"colour": "red"}, key="incomplete-facts"),
        sample(reference="  ", completion="It is red.", key="no-reference"),
        sample(key="ok2"),
    ]
    rewards = reward(batch)
    assert len(rewards) == len(batch)
    assert rewards[0] == pytest.approx(1.0) and rewards[5] == pytest.approx(1.0)
    assert all(math.isnan(r) for r in rewards[1:5])
    assert reward.stats() == {"scored": 2.0, "missing_facts": 1.0, "malformed_facts": 2.0, "missing_reference": 1.0}


def test_missing_facts_is_logged_with_the_sample_key(caplog):
    with caplog.at_level("WARNING"):
        world_reward()([sample(facts=None, key="sample-17"), sample(facts=None, key="sample-18")])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "sample-17" in messages[0]


def test_world_reward_is_a_judge_reward_with_its_name():
    reward = world_reward("mean_of_ratios", name="world")
    assert isinstance(reward, JudgeReward) and reward.name == "world" and reward.reduce == "mean_of_ratios"
    with pytest.raises(ValueError, match="reduce"):
        world_reward("sum")
