"""The synthetic world's rule-based judge as a reward plug-in.

:class:`WorldJudge` scores a completion (answer A) against its reference (answer B) with
:func:`latent_mca.world.judge.judge_pair`, on the facts a dialogue sample of the synthetic world carries in
its ``facts`` field (the dialogue data modules put the sample's JSON fields into
``RewardInput.metadata``). It is pure Python, deterministic and needs no server, so it is the default reward
of the embedded CPU demo. An input without usable facts cannot be scored: it gets None (NaN reward) and is
counted in :meth:`WorldJudge.stats`, never scored as 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from latent_mca.rl.rewards.base import JudgeReward, PairScores, PairwiseJudge, Reduce, RewardInput
from latent_mca.world.judge import ASPECTS, judge_pair

log = logging.getLogger(__name__)

#: Counter names reported by :meth:`WorldJudge.stats`.
COUNTERS: tuple[str, ...] = ("scored", "missing_facts", "malformed_facts", "missing_reference")


class WorldJudge(PairwiseJudge):
    """Score completions with the synthetic world's rule-based judge.

    Each input needs ``metadata["facts"]`` (a dialogue sample's facts dict, see
    :func:`latent_mca.world.content.make_facts`) and a non-empty reference. Inputs without them get None;
    the first occurrence of each kind is logged with the sample key, and all are counted.

    Args:
        facts_key: Metadata key that holds the facts dict.
    """

    def __init__(self, facts_key: str = "facts") -> None:
        self.facts_key = facts_key
        self._counters = {name: 0 for name in COUNTERS}

    @property
    def aspects(self) -> tuple[str, ...]:
        """The world judge's aspect names, :data:`latent_mca.world.judge.ASPECTS`."""
        return ASPECTS

    def score(self, inputs: Sequence[RewardInput]) -> list[PairScores | None]:
        """Judge each completion against its reference on the sample's facts.

        Args:
            inputs: Completions with their references and metadata.

        Returns:
            One :class:`PairScores` (scores in [1, 10]) per input; None where facts or reference are missing or
            the facts are malformed.
        """
        return [self._score_one(item) for item in inputs]

    def _score_one(self, item: RewardInput) -> PairScores | None:
        metadata = item.metadata if isinstance(item.metadata, dict) else {}
        if self.facts_key not in metadata or metadata[self.facts_key] is None:
            return self._unscored("missing_facts", item, f"metadata has no {self.facts_key!r}")
        if item.reference is None or not str(item.reference).strip():
            return self._unscored("missing_reference", item, "the reference reply is empty")
        try:
            a, b = judge_pair(item.completion, item.reference, metadata[self.facts_key])
        except (TypeError, KeyError, ValueError) as err:
            return self._unscored("malformed_facts", item, f"{type(err).__name__}: {err}")
        self._counters["scored"] += 1
        return PairScores(ASPECTS, tuple(a[x] for x in ASPECTS), tuple(b[x] for x in ASPECTS))

    def _unscored(self, reason: str, item: RewardInput, detail: str) -> None:
        if self._counters[reason] == 0:
            log.warning("world judge cannot score sample %r (%s); it gets a NaN reward. Further cases are only "
                        "counted in stats()[%r].", item.key, detail, reason)
        self._counters[reason] += 1
        return None

    def stats(self) -> dict[str, float]:
        """Cumulative counters: ``scored``, ``missing_facts``, ``malformed_facts``, ``missing_reference``."""
        return {name: float(value) for name, value in self._counters.items()}


def world_reward(reduce: Reduce = "ratio_of_sums", name: str = "world_judge") -> JudgeReward:
    """The world judge as a reward function.

    Args:
        reduce: ``"ratio_of_sums"`` (sum of A's aspect scores over B's; the authors' RL reward) or
            ``"mean_of_ratios"`` (mean over aspects of A / B; the paper's judge score ratio).
        name: Logging name.

    Returns:
        A :class:`JudgeReward` over a fresh :class:`WorldJudge`; NaN for inputs the judge cannot score.
    """
    return JudgeReward(WorldJudge(), reduce=reduce, name=name)
