"""The GRPO family of clipped policy-gradient losses (grpo, bnpo, dr_grpo, dapo).

All four share the per-token objective

    l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) + beta KL_t,
    r_t = exp(logp_t - old_logp_t),  KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (the k3 estimator),

and differ only in how the masked per-token losses are aggregated into a scalar (the same semantics as TRL's
``loss_type`` of the same name). The action space is irrelevant here: ``logp`` are log-probabilities of the
sampled latent codes (LatentRLModule) or of the sampled tokens (TokenRLModule).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Algorithm = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
DAPO_EPSILON_HIGH = 0.28


def resolve_epsilon_high(algorithm: str, epsilon_low: float, epsilon_high: float | None) -> float:
    """The upper clip width: explicit value, else 0.28 for DAPO (clip-higher), else ``epsilon_low``."""
    if epsilon_high is not None:
        return float(epsilon_high)
    return DAPO_EPSILON_HIGH if algorithm == "dapo" else float(epsilon_low)


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    algorithm: str,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
    world_size: int = 1,
) -> Tensor:
    """Reduce masked per-token values to the scalar loss of ``algorithm``.

    * ``grpo``: mean over sequences of ``sum_t l m / max(sum_t m, 1)``. An all-padding row contributes 0 but
      still counts in the mean over the ``B`` rows (TRL's ``clamp(min=1)``), so it dilutes rather than NaNs.
    * ``bnpo``: ``sum l m / max(sum m, 1)`` over the whole local batch.
    * ``dr_grpo``: ``sum l m / (B * max_completion_length)`` — a constant normaliser, no length bias.
    * ``dapo``: ``sum l m / (num_items_in_batch / world_size)`` where ``num_items_in_batch`` is the number of
      completion tokens of the whole generation batch over all ranks (default: ``sum m`` of this batch, with
      ``world_size`` 1). DDP averages gradients over ranks, hence the division by ``world_size``: the averaged
      gradient is then the token mean over the global batch. Any gradient-accumulation scaling the trainer
      applies on top is the caller's to account for.

    Args:
        per_token: Per-token values, shape ``(B, T)``.
        mask: 1 for completion tokens that count, shape ``(B, T)``.
        algorithm: One of :data:`ALGORITHMS`.
        max_completion_length: Required for ``dr_grpo``.
        num_items_in_batch: Global completion-token count for ``dapo``.
        world_size: Number of data-parallel ranks sharing ``num_items_in_batch`` (``dapo`` only).

    Returns:
        The scalar loss.

    Raises:
        ValueError: On an unknown algorithm or a missing/invalid normaliser.
    """
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    if algorithm == "grpo":
        rows = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B,)
        return rows.mean()
    if algorithm == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if algorithm == "dr_grpo":
        if max_completion_length is None or max_completion_length <= 0:
            raise ValueError("algorithm 'dr_grpo' needs max_completion_length > 0 (its constant normaliser), "
                             f"got {max_completion_length!r}")
        return total / (per_token.shape[0] * max_completion_length)
    if algorithm == "dapo":
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        items = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        items = items.to(per_token.dtype).to(per_token.device)
        return total / (items / world_size).clamp(min=1.0 / world_size)
    raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")


def _check_shapes(logp: Tensor, advantages: Tensor, mask: Tensor, **others: Tensor | None) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got shape {tuple(logp.shape)}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from logp shape {tuple(logp.shape)}")
    for name, value in others.items():
        if value is not None and value.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(value.shape)} differs from logp shape {tuple(logp.shape)}")
    if advantages.shape != (logp.shape[0],):
        raise ValueError(f"advantages must be ({logp.shape[0]},), one per sequence, got {tuple(advantages.shape)}")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    algorithm: str,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
    world_size: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss of the GRPO family, with its logging statistics.

    Values at masked positions never reach the loss or its gradient (they may be anything, even NaN/inf).

    Args:
        logp: Log-probabilities of the sampled actions under the current policy, shape ``(B, T)``, with grad.
        old_logp: Log-probabilities under the policy that generated the rollouts, shape ``(B, T)``; None for
            on-policy updates (then ``old = logp.detach()`` and the ratio is 1 with the right gradient).
        ref_logp: Log-probabilities under the frozen reference policy, shape ``(B, T)``; None (or ``beta == 0``)
            drops the KL term.
        advantages: One advantage per sequence, shape ``(B,)``.
        mask: 1 for completion positions that count, shape ``(B, T)``.
        algorithm: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo`` (see :func:`aggregate`).
        epsilon_low: Lower clip width: ratios below ``1 - epsilon_low`` are clipped.
        epsilon_high: Upper clip width; default ``epsilon_low``, or 0.28 for ``dapo``.
        beta: KL coefficient.
        max_completion_length: Required for ``dr_grpo``.
        num_items_in_batch: Global completion-token count for ``dapo``.
        world_size: Data-parallel ranks sharing ``num_items_in_batch``.

    Returns:
        ``(loss, stats)``: the scalar to back-propagate, and detached scalars ``ratio_mean``,
        ``clip_ratio/low_mean`` (ratio below the band with A < 0: the clip is active), ``clip_ratio/high_mean``
        (above the band with A > 0), ``clip_ratio/region_mean`` (either), plus ``kl`` when ``ref_logp`` is
        given; all are token means over the masked positions of this batch.

    Raises:
        ValueError: On shape mismatches, an unknown algorithm, negative widths or a missing normaliser.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    _check_shapes(logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp)
    eps_high = resolve_epsilon_high(algorithm, epsilon_low, epsilon_high)
    if epsilon_low < 0 or eps_high < 0 or beta < 0:
        raise ValueError(f"epsilon_low, epsilon_high and beta must be >= 0, got {epsilon_low}, {eps_high}, {beta}")
    valid = mask.bool()
    fmask = valid.to(logp.dtype)
    zero = torch.zeros_like(logp)
    # Sanitising first keeps garbage at padding (e.g. -inf) from turning into NaN gradients through exp().
    logp = torch.where(valid, logp, zero)
    old = logp.detach() if old_logp is None else torch.where(valid, old_logp.to(logp.dtype), zero)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # (B, 1)
    ratio = torch.exp(logp - old)  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    stats: dict[str, Tensor] = {}
    if ref_logp is not None:
        delta = torch.where(valid, ref_logp.to(logp.dtype), zero) - logp
        kl = torch.exp(delta) - delta - 1.0  # (B, T), k3 estimator, >= 0
        if beta > 0:
            per_token = per_token + beta * kl
        stats["kl"] = _masked_mean(kl.detach(), fmask)
    loss = aggregate(per_token, fmask, algorithm, max_completion_length=max_completion_length,
                     num_items_in_batch=num_items_in_batch, world_size=world_size)
    with torch.no_grad():
        low = ((ratio < 1.0 - epsilon_low) & (adv < 0)).to(logp.dtype)
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).to(logp.dtype)
        stats["ratio_mean"] = _masked_mean(ratio.detach(), fmask)
        stats["clip_ratio/low_mean"] = _masked_mean(low, fmask)
        stats["clip_ratio/high_mean"] = _masked_mean(high, fmask)
        stats["clip_ratio/region_mean"] = _masked_mean(torch.clamp(low + high, max=1.0), fmask)
    return loss, stats
