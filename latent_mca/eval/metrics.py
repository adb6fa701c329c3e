"""The judge score ratio: the paper's headline metric, computed as the authors' evaluation scripts do.

For every sample ``i`` and generation index ``g`` a pairwise judge scores the model's reply (answer A) against
the reference (answer B) on ``D`` aspects. The protocol (``calculate_mean_score_with_std`` with
``use_ratio=True`` in the authors' code) is:

1. per judgement, ``r_{i,g} = mean_d a_d / (b_d + 1e-6)`` (:meth:`PairScores.mean_of_ratios`);
2. per generation ``g``, ``R_g = mean_i r_{i,g}`` over the samples whose judgement succeeded;
3. report ``mean_g R_g`` and the sample standard deviation of the ``R_g`` (``statistics.stdev``).

Differences from the authors' script, on purpose:

- Failed judgements (``None``) are excluded exactly as theirs are, but they are **counted** (in total and per
  generation) instead of being dropped by a bare ``except: continue``.
- With a single generation the standard deviation is **NaN**, not 0: one generation says nothing about the
  spread, and 0 would claim there is none. (``statistics.stdev`` itself raises for fewer than two values.)
- A generation in which no judgement succeeded has ``R_g = NaN``; it is listed in
  :attr:`RatioReport.empty_generations` and left out of the mean and the standard deviation.

Per-aspect means of ``a``, ``b`` and ``a / (b + 1e-6)`` are reduced the same way (mean over samples within a
generation, then mean over generations), so the mean over aspects of the per-aspect ratios equals the headline
mean. The paper prints ``100 x`` the mean (e.g. "95.3").
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from latent_mca.rl.rewards.base import RATIO_EPS, PairScores

ScoreTable = Mapping[tuple[str, int], "PairScores | None"]
"""Judgements keyed by ``(sample key, generation index)``; None marks a failed judgement."""


@dataclass(frozen=True)
class RatioReport:
    """The judge score ratio of one split.

    Attributes:
        mean: Mean over generations of the per-generation ratios (NaN if nothing was scored).
        std: Sample standard deviation over generations (NaN with fewer than two scored generations).
        generations: The generation indices seen, sorted.
        per_generation: ``R_g`` for each entry of :attr:`generations` (NaN where nothing was scored).
        scored_per_generation: Number of scored samples for each generation.
        excluded_per_generation: Number of failed (None) judgements for each generation.
        empty_generations: Generations with no scored sample (left out of :attr:`mean` and :attr:`std`).
        aspects: Aspect names, in the judge's order.
        aspect_a: Per-aspect mean score of answer A (the model).
        aspect_b: Per-aspect mean score of answer B (the reference).
        aspect_ratio: Per-aspect mean of ``a / (b + 1e-6)``.
        num_samples: Number of distinct sample keys.
        num_judgements: Number of ``(key, generation)`` entries, scored or not.
        num_excluded: Number of failed judgements left out.
    """

    mean: float
    std: float
    generations: tuple[int, ...]
    per_generation: tuple[float, ...]
    scored_per_generation: tuple[int, ...]
    excluded_per_generation: tuple[int, ...]
    empty_generations: tuple[int, ...]
    aspects: tuple[str, ...]
    aspect_a: dict[str, float]
    aspect_b: dict[str, float]
    aspect_ratio: dict[str, float]
    num_samples: int
    num_judgements: int
    num_excluded: int

    @property
    def num_generations(self) -> int:
        """Number of generations that contributed to :attr:`mean`."""
        return len(self.generations) - len(self.empty_generations)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists; NaN stays a float)."""
        out = asdict(self)
        for name, value in out.items():
            if isinstance(value, tuple):
                out[name] = list(value)
        out["num_generations"] = self.num_generations
        return out


def _mean_or_nan(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _check_aspects(scores: ScoreTable) -> tuple[str, ...]:
    """The aspect names shared by every judgement (empty if none succeeded)."""
    aspects: tuple[str, ...] | None = None
    first_key: tuple[str, int] | None = None
    for key, item in scores.items():
        if item is None:
            continue
        if not isinstance(item, PairScores):
            raise TypeError(f"judgement for sample {key[0]!r}, generation {key[1]} is a "
                            f"{type(item).__name__}, expected PairScores or None")
        if aspects is None:
            aspects, first_key = item.aspects, key
        elif item.aspects != aspects:
            raise ValueError(f"judgement for sample {key[0]!r}, generation {key[1]} has aspects {item.aspects}, "
                             f"but sample {first_key[0]!r}, generation {first_key[1]} has {aspects}")
    if aspects is not None and len(set(aspects)) != len(aspects):
        raise ValueError(f"judgements repeat an aspect name: {aspects}")
    return aspects or ()


def _generation_stats(items: list[PairScores], aspects: tuple[str, ...]) -> tuple[float, list[list[float]]]:
    """``R_g`` and the per-aspect means of a, b and a/(b+eps) over the scored samples of one generation."""
    ratio = statistics.fmean(s.mean_of_ratios() for s in items)
    per_aspect = [
        [statistics.fmean(s.a[d] for s in items),
         statistics.fmean(s.b[d] for s in items),
         statistics.fmean(s.a[d] / (s.b[d] + RATIO_EPS) for s in items)]
        for d in range(len(aspects))
    ]
    return ratio, per_aspect


def judge_score_ratio(scores: ScoreTable) -> RatioReport:
    """Compute the paper's judge score ratio with its spread over generations.

    Args:
        scores: One entry per ``(sample key, generation index)``: the judge's :class:`PairScores`, or None
            where the judgement failed (excluded from the averages and counted).

    Returns:
        The report.

    Raises:
        ValueError: If judgements disagree on the aspect names, or a key is not ``(str, int)``.
        TypeError: If an entry is neither PairScores nor None.
    """
    for key in scores:
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], int)):
            raise ValueError(f"score keys must be (sample key, generation index) pairs, got {key!r}")
    aspects = _check_aspects(scores)
    generations = tuple(sorted({g for _, g in scores}))
    per_gen: list[float] = []
    scored: list[int] = []
    excluded: list[int] = []
    aspect_rows: list[list[list[float]]] = []  # per scored generation: (D, 3) means of a, b, a/b
    for g in generations:
        items = [s for (_, gg), s in scores.items() if gg == g and s is not None]
        excluded.append(sum(1 for (_, gg), s in scores.items() if gg == g and s is None))
        scored.append(len(items))
        if not items:
            per_gen.append(math.nan)
            continue
        ratio, per_aspect = _generation_stats(items, aspects)
        per_gen.append(ratio)
        aspect_rows.append(per_aspect)
    valid = [r for r in per_gen if not math.isnan(r)]
    by_aspect = [[_mean_or_nan([row[d][j] for row in aspect_rows]) for d in range(len(aspects))] for j in range(3)]
    return RatioReport(
        mean=_mean_or_nan(valid),
        std=statistics.stdev(valid) if len(valid) >= 2 else math.nan,
        generations=generations,
        per_generation=tuple(per_gen),
        scored_per_generation=tuple(scored),
        excluded_per_generation=tuple(excluded),
        empty_generations=tuple(g for g, r in zip(generations, per_gen) if math.isnan(r)),
        aspects=aspects,
        aspect_a=dict(zip(aspects, by_aspect[0])),
        aspect_b=dict(zip(aspects, by_aspect[1])),
        aspect_ratio=dict(zip(aspects, by_aspect[2])),
        num_samples=len({k for k, _ in scores}),
        num_judgements=len(scores),
        num_excluded=sum(excluded),
    )
