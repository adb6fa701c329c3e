"""The synthetic world's rule-based judge: MMRole-like aspects scored 1-10 from the reply's words.

Every aspect gives graded partial credit, so RL rewards carry signal before a policy is perfect:

- Instruction Adherence: the share of the asked-for attributes (colour, shape, position) the reply
  addresses at all, right or wrong.
- Fluency: terminal punctuation, a capital first letter, known words, no repeated trigrams or doubled
  words, a length within bounds.
- Image-Text Relevance: the share of the asked-for facts stated correctly, minus half a fact for each
  wrong value of an asked-for attribute.
- Response Accuracy: the precision of every scene fact the reply states (1 when it states none).
- Personality Consistency: the own catchphrase (partial credit for its content words) and style words,
  minus a quarter for each marker of another character.

``facts`` is the ``facts`` dict of a dialogue sample (:func:`latent_mca.world.content.make_facts`). The
judge is pure Python and takes tens of microseconds a call; any string, including an empty one or random
bytes, gets a score.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from latent_mca.world.content import COLOURS, POSITIONS, REQUESTED, SHAPES, known_words, words_of

ASPECTS: tuple[str, ...] = (
    "Instruction Adherence", "Fluency", "Image-Text Relevance", "Response Accuracy", "Personality Consistency",
)
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "position")
MIN_SCORE, MAX_SCORE = 1.0, 10.0
REQUIRED_FACTS: tuple[str, ...] = ("colour", "shape", "position", "question_type", "catchphrase", "style_words")
_DEFAULT_CHOICES = {"colour": tuple(COLOURS), "shape": SHAPES, "position": tuple(POSITIONS)}
# Function words carry no persona: a reply that merely says "the" earns no catchphrase credit.
_STOPWORDS = frozenset("a an the is are to and of it in at on for your all".split())
_FOREIGN_PENALTY = 0.25
_WRONG_FACT_PENALTY = 0.5
_MIN_WORDS = 3


@lru_cache(maxsize=4096)
def _phrases(items: tuple[str, ...]) -> tuple[str, ...]:
    """Normalised phrases (lower-case words joined by one space); empty ones dropped."""
    return tuple(p for p in (" ".join(words_of(x)) for x in items) if p)


@lru_cache(maxsize=16)
def _known(items: tuple[str, ...]) -> frozenset[str]:
    return frozenset(w for x in items for w in words_of(x))


def _scale(x: float) -> float:
    """Map a credit in [0, 1] (clipped) to a score in [1, 10]."""
    return MIN_SCORE + (MAX_SCORE - MIN_SCORE) * min(1.0, max(0.0, x))


def _check_facts(facts: Any) -> None:
    if not isinstance(facts, dict):
        raise TypeError(f"facts must be a dict (a dialogue sample's 'facts'), got {type(facts).__name__}")
    missing = [k for k in REQUIRED_FACTS if k not in facts]
    if missing:
        raise KeyError(f"facts lack {missing}; they have {sorted(facts)}")
    if not facts.get("requested") and facts["question_type"] not in REQUESTED:
        raise ValueError(f"unknown question_type {facts['question_type']!r}; known: {sorted(REQUESTED)}")


def _mentions(padded: str, facts: dict) -> dict[str, list[str]]:
    choices = facts.get("choices") or _DEFAULT_CHOICES
    return {a: [v for v in _phrases(tuple(choices.get(a, _DEFAULT_CHOICES[a]))) if f" {v} " in padded]
            for a in ATTRIBUTES}


def _scene_credits(mentions: dict[str, list[str]], facts: dict) -> tuple[float, float, float]:
    """(adherence, relevance, accuracy) credits in [0, 1]."""
    asked = [a for a in (facts.get("requested") or REQUESTED[facts["question_type"]]) if a in ATTRIBUTES]
    truth = {a: " ".join(words_of(str(facts[a]))) for a in ATTRIBUTES}
    if not asked:
        return 1.0, 1.0, 1.0
    addressed = sum(1 for a in asked if mentions[a]) / len(asked)
    correct = sum(1 for a in asked if truth[a] in mentions[a])
    wrong = sum(1 for a in asked for v in mentions[a] if v != truth[a])
    relevance = (correct - _WRONG_FACT_PENALTY * wrong) / len(asked)
    stated = sum(len(m) for m in mentions.values())
    right = sum(1 for a in ATTRIBUTES if truth[a] in mentions[a])
    accuracy = right / stated if stated else 0.0
    return addressed, relevance, accuracy


def _personality(words: list[str], padded: str, facts: dict) -> float:
    catch = _phrases((str(facts["catchphrase"]),))
    if catch and f" {catch[0]} " in padded:
        catch_credit = 1.0
    else:
        content = [w for w in words_of(str(facts["catchphrase"])) if w not in _STOPWORDS]
        present = set(words)
        catch_credit = 0.5 * sum(1 for w in content if w in present) / len(content) if content else 0.0
    style = _phrases(tuple(facts["style_words"]))
    style_credit = 1.0 if any(f" {s} " in padded for s in style) else 0.0
    own = set(catch) | set(style)
    foreign = sum(1 for m in _phrases(tuple(facts.get("foreign_markers", ()))) if m not in own and f" {m} " in padded)
    return 0.5 * catch_credit + 0.5 * style_credit - _FOREIGN_PENALTY * foreign


def _fluency(text: str, words: list[str], facts: dict) -> float:
    if not words:
        return 0.0
    stripped = text.strip()
    ends = 1.0 if stripped[-1] in ".!?" else 0.0
    first = next((ch for ch in stripped if ch.isalpha()), "")
    capital = 1.0 if first.isupper() else 0.0
    vocab = _known(tuple(facts["known_words"])) if facts.get("known_words") else known_words()
    known = sum(1 for w in words if w in vocab) / len(words)
    trigrams = list(zip(words, words[1:], words[2:]))
    doubled = sum(1 for a, b in zip(words, words[1:]) if a == b)
    repeats = (len(trigrams) - len(set(trigrams)) + doubled) / len(words)
    fresh = max(0.0, 1.0 - 2.0 * repeats)
    n, longest = len(words), int(facts.get("max_words", 30))
    length = n / _MIN_WORDS if n < _MIN_WORDS else (longest / n if n > longest else 1.0)
    return 0.15 * ends + 0.1 * capital + 0.35 * known + 0.2 * fresh + 0.2 * length


def score_reply(reply: Any, facts: dict) -> dict[str, float]:
    """Score one reply on every aspect of :data:`ASPECTS`.

    Args:
        reply: The reply text; anything else (None, numbers) is scored as its string form, None as empty.
        facts: The sample's facts: ``colour``, ``shape``, ``position``, ``question_type``, ``catchphrase``,
            ``style_words``; optional ``requested``, ``foreign_markers``, ``choices``, ``max_words``,
            ``known_words``.

    Returns:
        Aspect -> score in [1, 10].

    Raises:
        TypeError: If ``facts`` is not a dict.
        KeyError: If ``facts`` lacks a required key.
        ValueError: On an unknown question type.
    """
    _check_facts(facts)
    text = reply if isinstance(reply, str) else ("" if reply is None else str(reply))
    words = words_of(text)
    padded = f" {' '.join(words)} "
    adherence, relevance, accuracy = _scene_credits(_mentions(padded, facts), facts)
    return {
        "Instruction Adherence": _scale(adherence),
        "Fluency": _scale(_fluency(text, words, facts)),
        "Image-Text Relevance": _scale(relevance),
        "Response Accuracy": _scale(accuracy),
        "Personality Consistency": _scale(_personality(words, padded, facts)),
    }


def judge_pair(answer: Any, reference: Any, facts: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Score a model's answer (A) and the reference (B) on the same facts, as the MMRole judge does.

    Returns:
        (scores of the answer, scores of the reference), each aspect -> score in [1, 10].
    """
    return score_reply(answer, facts), score_reply(reference, facts)


def mean_score(scores: dict[str, float], aspects: Iterable[str] = ASPECTS) -> float:
    """The mean over aspects of one reply's scores."""
    values = [scores[a] for a in aspects]
    return sum(values) / len(values)
