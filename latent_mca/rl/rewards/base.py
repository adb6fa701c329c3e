"""The reward plug-in contract: one signature for every reward, NaN for "could not score".

A reward function maps a batch of :class:`RewardInput` (prompt conversation, generated completion, reference
reply, image, per-sample metadata, unique key) to one float per completion. NaN means the completion could not
be scored (a judge call failed, the reply was unparseable, a reference is missing); it is never silently
replaced by 0, because a 0 would look like a terrible answer and push the policy away from it. The RL loop
excludes NaN-rewarded completions from the advantages and the loss.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

RATIO_EPS = 1e-6
"""Added to the reference score in per-aspect ratios (the paper's evaluation protocol)."""


@dataclass
class RewardInput:
    """One completion to score.

    Attributes:
        prompt: The conversation the completion answers (chat messages, ending with a user turn).
        completion: The generated reply.
        reference: The ground-truth reply.
        image: The image shown to the policy (PIL image, encoded bytes or a path), or None.
        metadata: Per-sample facts (persona/profile, role set, judge hints such as ImageDesc and EvalHelp).
        key: Unique sample key (used in error messages and logs).
    """

    prompt: list[dict[str, Any]]
    completion: str
    reference: str
    image: Any | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    key: str = ""


@dataclass(frozen=True)
class PairScores:
    """Per-aspect judge scores of answer A (the model) and answer B (the reference).

    Attributes:
        aspects: Aspect names, in the judge's order.
        a: Scores of answer A, one per aspect.
        b: Scores of answer B, one per aspect.
    """

    aspects: tuple[str, ...]
    a: tuple[float, ...]
    b: tuple[float, ...]

    def __post_init__(self) -> None:
        """Check that both score tuples have one entry per aspect."""
        if not (len(self.aspects) == len(self.a) == len(self.b)) or not self.aspects:
            raise ValueError(f"PairScores needs one A and one B score per aspect, got {len(self.aspects)} aspects, "
                             f"{len(self.a)} A scores and {len(self.b)} B scores")

    def ratio_of_sums(self) -> float:
        """``sum_d a_d / sum_d b_d``: the authors' RL reward (NaN if the reference total is 0)."""
        total_b = sum(self.b)
        return sum(self.a) / total_b if total_b != 0 else math.nan

    def mean_of_ratios(self) -> float:
        """``mean_d a_d / (b_d + 1e-6)``: the paper's evaluation metric (judge score ratio)."""
        return sum(x / (y + RATIO_EPS) for x, y in zip(self.a, self.b)) / len(self.aspects)

    def swapped(self) -> PairScores:
        """The same judgement with the roles of A and B exchanged."""
        return PairScores(self.aspects, self.b, self.a)

    @staticmethod
    def average(items: Sequence[PairScores]) -> PairScores:
        """Aspect-wise mean of several judgements of the same pair (e.g. both presentation orders)."""
        if not items:
            raise ValueError("cannot average zero judgements")
        aspects = items[0].aspects
        if any(s.aspects != aspects for s in items):
            raise ValueError("cannot average judgements over different aspects")
        n = len(items)
        a = tuple(sum(s.a[d] for s in items) / n for d in range(len(aspects)))
        b = tuple(sum(s.b[d] for s in items) / n for d in range(len(aspects)))
        return PairScores(aspects, a, b)


class RewardFunction(abc.ABC):
    """A reward plug-in: ``reward(inputs) -> [float per input]``, NaN = could not score.

    Subclasses set :attr:`name` (used as the logging key) and may expose counters through :meth:`stats`.
    """

    name: str = "reward"

    @abc.abstractmethod
    def __call__(self, inputs: Sequence[RewardInput]) -> list[float]:
        """Score a batch of completions.

        Args:
            inputs: The completions with their context.

        Returns:
            One reward per input, in order; NaN where the completion could not be scored.
        """

    def stats(self) -> dict[str, float]:
        """Counters for logging (cumulative since construction); empty by default."""
        return {}


class PairwiseJudge(abc.ABC):
    """A judge that scores answer A (the completion) against answer B (the reference) on several aspects."""

    @property
    @abc.abstractmethod
    def aspects(self) -> tuple[str, ...]:
        """Names of the scored aspects, in order."""

    @abc.abstractmethod
    def score(self, inputs: Sequence[RewardInput]) -> list[PairScores | None]:
        """Judge each completion against its reference.

        Args:
            inputs: The completions with their context.

        Returns:
            One :class:`PairScores` per input, in order; None where the judgement failed.
        """

    def stats(self) -> dict[str, float]:
        """Counters for logging (cumulative since construction); empty by default."""
        return {}


Reduce = Literal["ratio_of_sums", "mean_of_ratios"]


class JudgeReward(RewardFunction):
    """Turn any :class:`PairwiseJudge` into a :class:`RewardFunction`.

    Args:
        judge: The judge.
        reduce: ``"ratio_of_sums"`` (the authors' RL reward, default) or ``"mean_of_ratios"`` (the paper's
            evaluation metric).
        name: Logging name.
    """

    def __init__(self, judge: PairwiseJudge, reduce: Reduce = "ratio_of_sums", name: str = "judge") -> None:
        if reduce not in ("ratio_of_sums", "mean_of_ratios"):
            raise ValueError(f"reduce must be 'ratio_of_sums' or 'mean_of_ratios', got {reduce!r}")
        self.judge = judge
        self.reduce = reduce
        self.name = name

    def __call__(self, inputs: Sequence[RewardInput]) -> list[float]:
        """Judge the batch and reduce each judgement to a float (NaN where the judge failed)."""
        scores = self.judge.score(inputs)
        if len(scores) != len(inputs):
            raise RuntimeError(f"{type(self.judge).__name__} returned {len(scores)} judgements for "
                               f"{len(inputs)} inputs")
        return [math.nan if s is None else float(getattr(s, self.reduce)()) for s in scores]

    def stats(self) -> dict[str, float]:
        """The judge's counters."""
        return self.judge.stats()
