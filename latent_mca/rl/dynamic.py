"""DAPO dynamic sampling: fill each update with groups whose rewards differ, drawing more prompts if needed.

A group whose completions all got the same reward has zero advantage everywhere: it costs a rollout and adds
nothing to the gradient but dilutes it. DAPO drops such groups and keeps sampling from the next prompts until
the update has a full batch of informative groups. In a Lightning loop "the next prompts" are the next training
batches, so :class:`GroupRefill` is a buffer that lives across ``training_step`` calls: each step adds the kept
groups of its rollout, and the RL module updates only when the buffer holds a batch worth of groups (or after
``rl.dynamic_sampling_max_batches`` data batches, whichever comes first; the shortfall is logged). Steps that
only sample do not move ``trainer.global_step``, so ``max_steps`` counts updates, as in DAPO; the data position
follows the batches actually drawn (:attr:`~latent_mca.phases.base.PhaseModule.train_batches_seen`).

The buffer is empty after every update (surplus groups are dropped, as DAPO does), and checkpoints are written
only after updates, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch import Tensor

from latent_mca.rl.advantages import dynamic_sampling_mask

P = TypeVar("P")


def group_rows(groups: Tensor, group_size: int) -> Tensor:
    """Row indices ``(len(groups) * group_size,)`` of the given groups, rows grouped by prompt."""
    return (groups[:, None] * group_size + torch.arange(group_size, device=groups.device)).flatten()


@dataclass
class Refilled(Generic[P]):
    """A full update batch assembled from one or more rollouts.

    Attributes:
        payload: The kept groups' rollout data (whatever the RL module stores), ``groups * G`` rows.
        rewards: Their rewards ``(N,)`` (all NaN when no group was kept: nothing to learn from).
        lengths: Their completion lengths ``(N,)``.
        finished: Whether each ended with an end-of-turn token ``(N,)``.
        stats: ``reward`` (mean over every sampled completion, kept or not), ``groups_kept`` (fraction of the
            sampled groups with a reward spread), ``sampling_batches`` (data batches drawn for this update) and
            ``groups_short`` (groups missing from a full batch when the batch limit was hit).
    """

    payload: P
    rewards: Tensor
    lengths: Tensor
    finished: Tensor
    stats: dict[str, float]


@dataclass
class GroupRefill(Generic[P]):
    """Buffer of informative groups across data batches (DAPO dynamic sampling).

    Args:
        group_size: Completions per prompt (G).
        max_batches: Data batches drawn at most for one update; when reached, the update uses what was kept.
        select: ``select(payload, groups)`` keeps the given group indices (1-D long tensor) of a payload.
        cat: ``cat(payloads)`` stacks payloads row-wise.
    """

    group_size: int
    max_batches: int
    select: Callable[[P, Tensor], P]
    cat: Callable[[Sequence[P]], P]
    _parts: list[tuple[P, Tensor, Tensor, Tensor]] = field(default_factory=list)
    _sampled: list[Tensor] = field(default_factory=list)
    _groups_seen: int = 0
    _fallback: tuple[P, Tensor, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.max_batches < 1:
            raise ValueError("rl.dynamic_sampling_max_batches must be >= 1")

    @property
    def batches(self) -> int:
        """Data batches drawn since the last update."""
        return len(self._sampled)

    @property
    def kept_groups(self) -> int:
        """Informative groups held."""
        return sum(int(r.numel()) for _, r, _, _ in self._parts) // self.group_size

    def add(self, payload: P, rewards: Tensor, lengths: Tensor, finished: Tensor) -> None:
        """Keep the groups of one rollout whose valid rewards differ (NaN = unscored, never equal to anything).

        Args:
            payload: The rollout (rows grouped by prompt, ``G`` each).
            rewards: Rewards ``(N,)``.
            lengths: Completion lengths ``(N,)``.
            finished: Whether each completion ended with an end-of-turn token ``(N,)``.
        """
        g = self.group_size
        keep = dynamic_sampling_mask(rewards, g).view(-1, g)[:, 0]  # (groups,)
        first = torch.zeros(1, dtype=torch.long, device=rewards.device)
        self._fallback = (self.select(payload, first), lengths[:g], finished[:g])
        self._sampled.append(rewards.detach())
        self._groups_seen += int(keep.numel())
        groups = keep.nonzero().flatten()
        if groups.numel():
            rows = group_rows(groups, g)  # (kept * G,)
            self._parts.append((self.select(payload, groups), rewards[rows], lengths[rows], finished[rows]))

    def ready(self, target_groups: int) -> bool:
        """Whether this rank can update: enough groups held, or the data batch limit reached."""
        return self.kept_groups >= target_groups or self.batches >= self.max_batches

    def pop(self, target_groups: int) -> Refilled[P]:
        """The first ``target_groups`` kept groups and the sampling statistics; empties the buffer.

        Surplus groups are dropped, as in DAPO.

        When no group was kept, the batch is the first group of the last rollout with NaN rewards: it takes no
        part in the loss (advantage 0, masked out) but lets this rank run the same collective calls as the
        ranks that did keep groups.
        """
        sampled = torch.cat(self._sampled)
        valid = sampled[~torch.isnan(sampled)]
        stats = {
            "reward": float(valid.mean()) if valid.numel() else float("nan"),
            "groups_kept": self.kept_groups / max(self._groups_seen, 1),
            "sampling_batches": float(self.batches),
            "groups_short": float(max(target_groups - self.kept_groups, 0)),
        }
        parts = self._parts
        self._parts, self._sampled, self._groups_seen = [], [], 0
        if not parts:
            if self._fallback is None:
                raise RuntimeError("GroupRefill.pop before any add")
            payload, lengths, finished = self._fallback
            return Refilled(payload, torch.full_like(lengths, float("nan"), dtype=torch.float32), lengths, finished,
                            stats)
        payload = parts[0][0] if len(parts) == 1 else self.cat([p[0] for p in parts])
        rewards, lengths, finished = (torch.cat([p[i] for p in parts]) for i in (1, 2, 3))
        n = min(target_groups, rewards.numel() // self.group_size)
        if n * self.group_size < rewards.numel():
            keep = torch.arange(n, device=rewards.device)
            payload = self.select(payload, keep)
            rows = slice(0, n * self.group_size)
            rewards, lengths, finished = rewards[rows], lengths[rows], finished[rows]
        return Refilled(payload, rewards, lengths, finished, stats)
