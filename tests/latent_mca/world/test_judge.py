import random
import re
import time

import pytest

from latent_mca.world.judge import ASPECTS, judge_pair, mean_score, score_reply
from tests.latent_mca.world.conftest import samples_of

FACTS = {
    "character": "Captain Rook", "catchphrase": "Hoist the sails!", "style_words": ["ahoy", "matey"],
    "question_type": "describe", "requested": ["colour", "shape", "position"],
    "colour": "red", "shape": "circle", "position": "top left",
    "foreign_markers": ["Knowledge is power!", "indeed", "fascinating"],
    "choices": {"colour": ["red", "green", "blue"], "shape": ["circle", "square"],
                "position": ["top left", "top right", "center"]},
    "max_words": 30,
}
GOOD = "Ahoy! It is a red circle at the top left. Hoist the sails!"
TOP = {a: 10.0 for a in ASPECTS}

RELEVANCE, ACCURACY, PERSONA, FLUENCY, ADHERENCE = (
    "Image-Text Relevance", "Response Accuracy", "Personality Consistency", "Fluency", "Instruction Adherence")


def facts_for(question_type):
    requested = ["colour", "shape", "position"] if question_type == "describe" else [question_type]
    return {**FACTS, "question_type": question_type, "requested": requested}


def test_aspects_are_mmrole_like():
    assert 4 <= len(ASPECTS) <= 6 and len(set(ASPECTS)) == len(ASPECTS)
    assert {"Instruction Adherence", "Fluency", "Image-Text Relevance", "Personality Consistency"} <= set(ASPECTS)


def test_a_correct_in_character_reply_gets_the_top_score():
    assert score_reply(GOOD, FACTS) == TOP
    assert score_reply("Listen, matey. It is red. Hoist the sails!", facts_for("colour")) == TOP


def test_relevance_grows_with_each_correct_fact():
    replies = ["Ahoy! It is nice. Hoist the sails!", "Ahoy! It is red. Hoist the sails!",
               "Ahoy! It is a red circle. Hoist the sails!", GOOD]
    relevance = [score_reply(r, FACTS)[RELEVANCE] for r in replies]
    adherence = [score_reply(r, FACTS)[ADHERENCE] for r in replies]
    assert relevance == sorted(set(relevance)) and relevance[0] == 1.0 and relevance[-1] == 10.0
    assert adherence == sorted(set(adherence))


def test_wrong_facts_cost_relevance_and_accuracy_but_not_adherence():
    right = score_reply("Ahoy! It is red. Hoist the sails!", facts_for("colour"))
    wrong = score_reply("Ahoy! It is blue. Hoist the sails!", facts_for("colour"))
    hedged = score_reply("Ahoy! It is red or blue. Hoist the sails!", facts_for("colour"))
    for aspect in (RELEVANCE, ACCURACY):
        assert wrong[aspect] < hedged[aspect] < right[aspect]
    assert wrong[ADHERENCE] == right[ADHERENCE] == 10.0
    assert wrong[PERSONA] == right[PERSONA]
    # An extra, wrong fact the question did not ask for still costs accuracy, not relevance.
    extra = score_reply("Ahoy! It is a red square. Hoist the sails!", facts_for("colour"))
    assert extra[RELEVANCE] == 10.0 and extra[ACCURACY] < 10.0


def test_personality_credits_own_markers_and_penalises_foreign_ones():
    neutral = "It is a red circle at the top left."
    scores = [score_reply(r, FACTS)[PERSONA] for r in (
        neutral, f"{neutral} Hoist the sails!", f"Ahoy! {neutral}", GOOD)]
    assert scores[0] == 1.0 and scores[0] < scores[1] < scores[3] and scores[0] < scores[2] < scores[3]
    assert score_reply("Ahoy! It is a red circle at the top left. Hoist the sails.", FACTS)[PERSONA] == 10.0
    partial = score_reply(f"{neutral} Hoist them.", FACTS)[PERSONA]  # some words of the catchphrase
    assert 1.0 < partial < scores[1]
    foreign = score_reply(f"Indeed. {neutral} Hoist the sails!", FACTS)[PERSONA]
    assert foreign < scores[1]
    other = score_reply(f"Indeed. {neutral} Knowledge is power!", FACTS)
    assert other[PERSONA] == 1.0 and other[RELEVANCE] == 10.0


@pytest.mark.parametrize("bad", [
    "ahoy! It is a red circle at the top left. Hoist the sails",  # no capital, no final punctuation
    "Ahoy! It is a red circle at the top left. Hoist the the sails!",  # doubled word
    "Ahoy! It is a red circle at the top left. It is a red circle at the top left. Hoist the sails!",  # repeat
    "Ahoy! It is a red circle at the top left. Hoist the sails! " + "Yes and no. " * 12,  # too long
    "Ahoy! It is a red circle at the top left. Hoist the sails! Zorblax quimf.",  # unknown words
    "Red.",  # too short
])
def test_fluency_penalises_each_defect(bad):
    assert score_reply(bad, FACTS)[FLUENCY] < 10.0


@pytest.mark.parametrize("garbage", [None, "", "   ", "!!!", 12345, "\x00\xff\u2603 ☃☃ ", "a" * 5000,
                                     "red red red red red red red red"])
def test_garbage_gets_scores_in_range(garbage):
    scores = score_reply(garbage, FACTS)
    assert list(scores) == list(ASPECTS)
    assert all(1.0 <= v <= 10.0 for v in scores.values())
    assert mean_score(scores) < mean_score(TOP)


def test_random_text_never_raises():
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz .,!?'-ÄéЖ中\n\t" + "".join(map(chr, range(0x20, 0x7f)))
    for _ in range(300):
        reply = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        scores = score_reply(reply, FACTS)
        assert all(1.0 <= v <= 10.0 for v in scores.values())


def test_bad_facts_raise_clear_errors():
    with pytest.raises(KeyError, match="catchphrase"):
        score_reply(GOOD, {k: v for k, v in FACTS.items() if k != "catchphrase"})
    with pytest.raises(TypeError, match="dict"):
        score_reply(GOOD, ["not", "facts"])
    with pytest.raises(ValueError, match="question_type"):
        score_reply(GOOD, {**FACTS, "question_type": "smell", "requested": []})


def test_judge_pair_scores_answer_and_reference_on_the_same_facts():
    answer, reference = judge_pair("Ahoy! It is blue. Hoist the sails!", GOOD, FACTS)
    assert reference == TOP and answer == score_reply("Ahoy! It is blue. Hoist the sails!", FACTS)
    assert answer[RELEVANCE] < reference[RELEVANCE]


def test_judge_is_fast():
    start = time.perf_counter()
    for i in range(2000):
        score_reply(GOOD if i % 2 else "Indeed. It is blue. Knowledge is power!", FACTS)
    assert time.perf_counter() - start < 2.0  # >= 1000 calls/s even on a busy CPU


def dialogue_records(world):
    out, _, wj = world
    return [r for _, r, _ in samples_of(out / "dialogue")], wj


def test_every_reference_in_the_world_gets_the_top_score(world):
    records, _ = dialogue_records(world)
    assert records
    for record in records:
        assert score_reply(record["reference"], record["facts"]) == TOP, record["reference"]


def test_wrong_colour_persona_and_garbage_score_lower_on_the_right_aspects(world):
    records, wj = dialogue_records(world)
    characters = {c["name"]: c for c in wj["characters"]}
    colours = list(wj["colours"])
    for record in records:
        facts, reference = record["facts"], record["reference"]
        ref = score_reply(reference, facts)
        if "colour" in facts["requested"]:
            other = colours[(colours.index(facts["colour"]) + 1) % len(colours)]
            wrong = score_reply(re.sub(rf"\b{facts['colour']}\b", other, reference), facts)
            assert wrong[RELEVANCE] < ref[RELEVANCE] and wrong[ACCURACY] < ref[ACCURACY]
            assert wrong[PERSONA] == ref[PERSONA] and wrong[FLUENCY] == ref[FLUENCY]
        me = characters[record["character"]]
        them = next(c for name, c in characters.items() if name != me["name"])
        opener = next(o for o in me["openers"] if reference.startswith(o))
        persona = reference.replace(opener, them["openers"][0]).replace(me["catchphrase"], them["catchphrase"])
        swapped = score_reply(persona, facts)
        assert swapped[PERSONA] < ref[PERSONA] and swapped[RELEVANCE] == ref[RELEVANCE]
        for garbage in ("", "qzx vvk plorf", "the the the the"):
            scores = score_reply(garbage, facts)
            assert all(scores[a] < ref[a] for a in ASPECTS), (garbage, scores)
