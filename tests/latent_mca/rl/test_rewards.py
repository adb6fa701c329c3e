"""Reward plug-in contract, judge prompts, reference metrics and weighted sums."""

from __future__ import annotations

import math
import pickle

import pytest

from latent_mca.rl.rewards import (
    MMROLE_ASPECTS,
    PCOGALIGN_ASPECTS,
    JudgeReward,
    MissingMetadataError,
    PairScores,
    PairwiseJudge,
    ReferenceMetricReward,
    RewardFunction,
    RewardInput,
    WeightedReward,
    mmrole_messages,
    pcogalign_messages,
)

NAN = math.nan


def inp(completion: str, reference: str = "", key: str = "k") -> RewardInput:
    return RewardInput(prompt=[{"role": "user", "content": "hi"}], completion=completion, reference=reference, key=key)


class Fixed(RewardFunction):
    def __init__(self, values, name="fixed"):
        self.values, self.name, self.calls = values, name, 0

    def __call__(self, inputs):
        self.calls += 1
        return list(self.values[:len(inputs)])

    def stats(self):
        return {"calls": float(self.calls)}


# ---- PairScores / JudgeReward ---------------------------------------------------------------------------------

def test_ratio_of_sums_differs_from_mean_of_ratios():
    s = PairScores(("x", "y"), (8.0, 6.0), (4.0, 6.0))
    assert s.ratio_of_sums() == pytest.approx(14 / 10)
    assert s.mean_of_ratios() == pytest.approx((8 / 4 + 6 / 6) / 2, rel=1e-6)
    assert s.swapped().a == (4.0, 6.0)
    avg = PairScores.average([s, PairScores(("x", "y"), (6.0, 6.0), (6.0, 2.0))])
    assert avg.a == (7.0, 6.0) and avg.b == (5.0, 4.0)
    assert math.isnan(PairScores(("x",), (3.0,), (0.0,)).ratio_of_sums())
    with pytest.raises(ValueError, match="per aspect"):
        PairScores(("x", "y"), (1.0,), (1.0, 2.0))


class StubJudge(PairwiseJudge):
    def __init__(self, results):
        self.results = results

    @property
    def aspects(self):
        return ("x", "y")

    def score(self, inputs):
        return self.results


def test_judge_reward_turns_failures_into_nan():
    good = PairScores(("x", "y"), (8.0, 6.0), (4.0, 6.0))
    reward = JudgeReward(StubJudge([good, None]))
    out = reward([inp("a"), inp("b")])
    assert out[0] == pytest.approx(1.4) and math.isnan(out[1])
    assert JudgeReward(StubJudge([good]), reduce="mean_of_ratios")([inp("a")])[0] == pytest.approx(1.5, rel=1e-6)
    with pytest.raises(RuntimeError, match="1 judgements for 2 inputs"):
        JudgeReward(StubJudge([good]))([inp("a"), inp("b")])
    with pytest.raises(ValueError, match="reduce"):
        JudgeReward(StubJudge([]), reduce="sum")


# ---- prompts -------------------------------------------------------------------------------------------------

def test_mmrole_prompt_contents_and_order():
    prompt = [{"role": "system", "content": "Play Bob."},
              {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the sky?"}]}]
    meta = {"character_role": "Bob", "character_profile": {"personality": "grumpy", "catchphrase": "Bah!"}}
    msgs = mmrole_messages(prompt, "ANSWER_ONE", "ANSWER_TWO", meta)
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert user.index("What is in the sky?") < user.index("ANSWER_ONE") < user.index("ANSWER_TWO")
    assert "<image>" in user and "Bob" in user and "grumpy" in user and "Bah!" in user
    positions = [user.rindex(name) for name in MMROLE_ASPECTS]
    assert positions == sorted(positions)
    assert "exactly 8 lines" in user and "[Scores]: (<score of A>, <score of B>)" in user


def test_pcogalign_prompt_contents():
    meta = {"role_set": {"office": "manager", "home": "father"}, "image_desc": "a crowded train",
            "eval_help": "practical tips", "location": "the station"}
    msgs = pcogalign_messages([{"role": "user", "content": "How do I get a seat?"}], "RESP_A", "RESP_B", meta)
    user = msgs[1]["content"]
    assert "manager at office; father at home" in user and "manager at office" in msgs[0]["content"]
    assert "a crowded train" in user and "practical tips" in user and "the station" in user
    assert "How do I get a seat?" in user and user.index("RESP_A") < user.index("RESP_B")
    assert all(name in user for name in PCOGALIGN_ASPECTS) and "exactly 5 lines" in user
    assert user.endswith("Interviewee: ")


def test_prompt_missing_metadata_is_a_clear_error():
    with pytest.raises(MissingMetadataError, match="role set.*role_set"):
        pcogalign_messages([{"role": "user", "content": "q"}], "a", "b", {"ImageDesc": "x", "EvalHelp": "y"})
    with pytest.raises(MissingMetadataError, match="role name"):
        mmrole_messages([], "a", "b", {"profile": "p"})


# ---- reference metrics ---------------------------------------------------------------------------------------

def test_reference_metrics_hand_values():
    same = "the red circle is at the top left"
    assert ReferenceMetricReward("bleu")([inp(same, same)]) == [pytest.approx(1.0)]
    assert ReferenceMetricReward("chrf")([inp(same, same)]) == [pytest.approx(1.0)]
    # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4
    assert ReferenceMetricReward("rouge_l")([inp("a b c d", "a c d e")]) == [pytest.approx(0.75)]
    # unigram overlap 3 of 4 -> F = 0.75; bigram overlap ("c d") 1 of 3
    assert ReferenceMetricReward("rouge1")([inp("a b c d", "a c d e")]) == [pytest.approx(0.75)]
    assert ReferenceMetricReward("rouge2")([inp("a b c d", "a c d e")]) == [pytest.approx(1 / 3)]
    # TER: one substitution over 3 reference words, negated so that higher is better
    assert ReferenceMetricReward("ter")([inp("a b c", "a b d")]) == [pytest.approx(-1 / 3)]


def test_reference_metrics_rank_and_nan():
    reward = ReferenceMetricReward("chrf", name="chrf_ref")
    out = reward([inp("a red circle", "a red circle at the top"), inp("green", "a red circle at the top"),
                  inp("anything", "  ")])
    assert out[0] > out[1] >= 0.0 and math.isnan(out[2])
    assert reward.stats() == {"unscored": 1.0} and reward.name == "chrf_ref"
    assert pickle.loads(pickle.dumps(reward))([inp("a blue square", "a blue square")]) == [pytest.approx(1.0)]
    for metric in ("sacre_bleu", "eed"):
        near, far = ReferenceMetricReward(metric)([inp("the cat sat down", "the cat sat down"),
                                                   inp("dogs bark", "the cat sat down")])
        assert near > far
    with pytest.raises(ValueError, match="available offline"):
        ReferenceMetricReward("bertscore")
    with pytest.raises(ValueError, match="nltk"):
        ReferenceMetricReward("rouge_l", use_stemmer=True)


# ---- weighted sums -------------------------------------------------------------------------------------------

def test_weighted_sum_mapping_form():
    a, b = Fixed([1.0, 2.0, NAN]), Fixed([10.0, NAN, NAN])
    reward = WeightedReward({"a": a, "b": b}, weights={"b": 0.5})
    out = reward([inp("x"), inp("y"), inp("z")])
    assert out[0] == pytest.approx(1.0 + 5.0)
    assert math.isnan(out[1]) and math.isnan(out[2])  # a NaN component makes the total NaN
    assert reward.last_components["b"][0] == 10.0
    assert reward.stats() == {"a/calls": 1.0, "b/calls": 1.0}


def test_weighted_sum_renormalises_over_available():
    reward = WeightedReward([(Fixed([1.0, 2.0, NAN]), 1.0), (Fixed([10.0, NAN, NAN]), 3.0)], renormalize=True)
    out = reward([inp("x"), inp("y"), inp("z")])
    assert out[0] == pytest.approx(1.0 + 30.0)
    assert out[1] == pytest.approx(2.0 * 4.0 / 1.0)  # only the first (weight 1 of 4) scored
    assert math.isnan(out[2])
    assert set(reward.last_components) == {"fixed", "fixed_2"}


def test_weighted_sum_errors():
    with pytest.raises(ValueError, match="unknown rewards"):
        WeightedReward({"a": Fixed([1.0])}, weights={"c": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        WeightedReward({})
    with pytest.raises(RuntimeError, match="returned 1 values for 2 inputs"):
        WeightedReward({"a": Fixed([1.0])})([inp("x"), inp("y")])
