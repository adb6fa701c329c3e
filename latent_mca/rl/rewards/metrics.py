"""Reference-based text-similarity rewards through torchmetrics' functional text metrics.

Every metric here runs offline with the base install (no nltk, no downloaded models):

==============  ===================================================  ===========
name            torchmetrics function                                 reward
==============  ===================================================  ===========
``bleu``        ``bleu_score`` (whitespace tokens)                    score
``sacre_bleu``  ``sacre_bleu_score`` (``13a`` tokeniser by default)   score
``chrf``        ``chrf_score`` (chrF++ with ``n_word_order=2``)       score
``rouge1``      ``rouge_score(rouge_keys="rouge1")`` F-measure        score
``rouge2``      ``rouge_score(rouge_keys="rouge2")`` F-measure        score
``rouge_l``     ``rouge_score(rouge_keys="rougeL")`` F-measure        score
``ter``         ``translation_edit_rate``                             -score
``eed``         ``extended_edit_distance``                            -score
==============  ===================================================  ===========

Edit-based metrics are negated so that higher is always better. Not offered: ROUGE-Lsum and ROUGE with
``use_stemmer=True`` (both need nltk), BERTScore/InfoLM (need a downloaded model). A sample whose reference
is empty cannot be scored and gets NaN.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Sequence

from latent_mca.rl.rewards.base import RewardFunction, RewardInput

MetricName = Literal["bleu", "sacre_bleu", "chrf", "rouge1", "rouge2", "rouge_l", "ter", "eed"]

# name -> (torchmetrics.functional.text function, ROUGE key or None, sign). Resolved lazily: importing
# torchmetrics takes seconds, and judge-only users should not pay for it.
_METRICS: dict[str, tuple[str, str | None, float]] = {
    "bleu": ("bleu_score", None, 1.0),
    "sacre_bleu": ("sacre_bleu_score", None, 1.0),
    "chrf": ("chrf_score", None, 1.0),
    "rouge1": ("rouge_score", "rouge1", 1.0),
    "rouge2": ("rouge_score", "rouge2", 1.0),
    "rouge_l": ("rouge_score", "rougeL", 1.0),
    "ter": ("translation_edit_rate", None, -1.0),
    "eed": ("extended_edit_distance", None, -1.0),
}
METRICS: tuple[str, ...] = tuple(_METRICS)


def _metric_fn(metric: str) -> Callable[[str, str], Any]:
    """``fn(completion, reference) -> score`` for one pair."""
    from torchmetrics.functional import text

    fn_name, rouge_key, _ = _METRICS[metric]
    fn = getattr(text, fn_name)
    if rouge_key is None:
        return lambda pred, ref, **kw: fn([pred], [[ref]], **kw)
    return lambda pred, ref, **kw: fn([pred], [ref], rouge_keys=rouge_key, **kw)[f"{rouge_key}_fmeasure"]


class ReferenceMetricReward(RewardFunction):
    """Score each completion by a text-similarity metric against its reference.

    Args:
        metric: One of :data:`METRICS` (see the module table).
        name: Logging name (default: the metric's).
        **metric_kwargs: Passed to the torchmetrics function (e.g. ``smooth=True`` for BLEU, ``n_gram=2``).

    Raises:
        ValueError: On an unknown metric name.
    """

    def __init__(self, metric: MetricName = "chrf", name: str | None = None, **metric_kwargs: Any) -> None:
        if metric not in _METRICS:
            raise ValueError(f"unknown metric {metric!r}; available offline: {list(METRICS)}")
        if metric.startswith("rouge") and metric_kwargs.get("use_stemmer"):
            raise ValueError("ROUGE with use_stemmer=True needs nltk, which is not a dependency")
        self.metric = metric
        self.name = name or metric
        self.metric_kwargs = metric_kwargs
        self._sign = _METRICS[metric][2]
        _metric_fn(metric)  # import torchmetrics now: fail at construction, not mid-training
        self._unscored = 0

    def __call__(self, inputs: Sequence[RewardInput]) -> list[float]:
        """One metric value per completion (NaN where the reference is empty)."""
        fn = _metric_fn(self.metric)  # not stored: lambdas would make the reward unpicklable
        out = []
        for inp in inputs:
            if not (inp.reference or "").strip():
                self._unscored += 1
                out.append(math.nan)
                continue
            value = fn(inp.completion or "", inp.reference, **self.metric_kwargs)
            out.append(self._sign * float(value))
        return out

    def stats(self) -> dict[str, float]:
        """``unscored``: completions that had no reference to compare with."""
        return {"unscored": float(self._unscored)}
