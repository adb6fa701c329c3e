"""Weighted sums of reward plug-ins."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from latent_mca.rl.rewards.base import RewardFunction, RewardInput


class WeightedReward(RewardFunction):
    """``R = sum_i w_i R_i`` over several reward functions.

    A NaN component ("could not score") makes the total NaN by default, so one failed judge call never
    silently becomes a partial reward. With ``renormalize=True`` the total is instead computed over the
    components that scored and rescaled by ``sum_all |w| / sum_available |w|``, so that it stays on the scale
    of the full sum; it is NaN only when no component scored (or all available weights are 0).

    Args:
        rewards: Either a mapping ``name -> reward function`` (weights from ``weights``, default 1 each) or a
            sequence of ``(reward function, weight)`` pairs (named by each function's ``name``, made unique).
        weights: Weights by name, for the mapping form only.
        renormalize: Renormalise over the available components instead of propagating NaN.
        name: Logging name.

    Attributes:
        last_components: Each component's rewards from the most recent call, by name (for logging).
    """

    def __init__(self, rewards: Mapping[str, RewardFunction] | Sequence[tuple[RewardFunction, float]],
                 weights: Mapping[str, float] | None = None, *, renormalize: bool = False,
                 name: str = "weighted") -> None:
        if isinstance(rewards, Mapping):
            unknown = set(weights or {}) - set(rewards)
            if unknown:
                raise ValueError(f"weights name unknown rewards {sorted(unknown)}; rewards are {sorted(rewards)}")
            items = [(str(k), fn, float((weights or {}).get(k, 1.0))) for k, fn in rewards.items()]
        else:
            if weights is not None:
                raise ValueError("pass weights inside the (reward, weight) pairs, not as `weights`")
            items = []
            for fn, weight in rewards:
                base, k = getattr(fn, "name", type(fn).__name__), 1
                label = base
                while any(label == existing for existing, _, _ in items):
                    k += 1
                    label = f"{base}_{k}"
                items.append((label, fn, float(weight)))
        if not items:
            raise ValueError("WeightedReward needs at least one component")
        for label, _, weight in items:
            if not math.isfinite(weight):
                raise ValueError(f"weight of {label!r} must be finite, got {weight}")
        self.components = items
        self.renormalize = renormalize
        self.name = name
        self.last_components: dict[str, list[float]] = {}

    def __call__(self, inputs: Sequence[RewardInput]) -> list[float]:
        """Weighted sum per completion (NaN rules as in the class docstring)."""
        columns = {}
        for label, fn, _ in self.components:
            values = [float(v) for v in fn(inputs)]
            if len(values) != len(inputs):
                raise RuntimeError(f"reward {label!r} returned {len(values)} values for {len(inputs)} inputs")
            columns[label] = values
        self.last_components = columns
        total_abs = sum(abs(w) for _, _, w in self.components)
        out = []
        for i in range(len(inputs)):
            avail = [(w, columns[label][i]) for label, _, w in self.components if not math.isnan(columns[label][i])]
            if len(avail) == len(self.components):
                out.append(sum(w * v for w, v in avail))
            elif self.renormalize and sum(abs(w) for w, _ in avail) > 0:
                scale = total_abs / sum(abs(w) for w, _ in avail)
                out.append(scale * sum(w * v for w, v in avail))
            else:
                out.append(math.nan)
        return out

    def stats(self) -> dict[str, float]:
        """The components' counters, prefixed by their names."""
        out = {}
        for label, fn, _ in self.components:
            stats = getattr(fn, "stats", None)
            out.update({f"{label}/{k}": v for k, v in (stats() if callable(stats) else {}).items()})
        return out
