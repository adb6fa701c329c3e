"""Group-relative advantages and the DAPO reward/mask helpers.

Completions are laid out group by group: the ``group_size`` completions sampled for one prompt are contiguous,
so a flat reward vector of length ``N = num_groups * group_size`` reshapes to ``(num_groups, group_size)``.

A reward of NaN means "the reward function could not score this completion" (for example a judge call that
failed). Such a completion is left out of every statistic and gets advantage 0; the caller is expected to
mask it out of the loss as well (:func:`valid_reward_mask`), so that it neither pulls the group mean nor
receives a gradient. It is never counted as a reward of 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Scale = Literal["group", "batch", "none"]

DEFAULT_SCALE: dict[str, Scale] = {"grpo": "group", "bnpo": "group", "dr_grpo": "none", "dapo": "group"}
"""Recommended ``scale`` of :func:`group_advantages` for each loss algorithm.

Dr. GRPO argues that dividing by the group std up-weights prompts whose rewards barely vary (too easy or too
hard), so it only centres the rewards; the other algorithms keep TRL's default, per-group std scaling.
"""


def _grouped(rewards: Tensor, group_size: int, name: str = "rewards") -> Tensor:
    """Check a flat per-completion tensor and view it as ``(num_groups, group_size)``."""
    if rewards.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per completion), got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{name} has {rewards.numel()} entries, not a multiple of group_size={group_size}; completions must "
            "be laid out group by group"
        )
    return rewards.view(-1, group_size)  # (G, n)


def _unbiased_std(values: Tensor, valid: Tensor, mean: Tensor, count: Tensor, dim: int | None) -> Tensor:
    """Bessel-corrected std of ``values`` over ``valid`` entries (0 where fewer than 2 entries)."""
    sq = torch.where(valid, (values - mean) ** 2, torch.zeros_like(values))
    total = sq.sum() if dim is None else sq.sum(dim=dim, keepdim=True)
    return torch.sqrt(total / (count - 1).clamp(min=1))


def group_advantages(rewards: Tensor, group_size: int, scale: Scale = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages ``A = (R - mean_group R) / (std R + eps)``.

    The mean is always the group's. The std is the *unbiased* (Bessel-corrected, ``n - 1``) standard deviation,
    which is what ``torch.std`` and therefore TRL use:

    * ``"group"``: std over the group's valid rewards;
    * ``"batch"``: std over every valid reward in the batch (still centred on the group mean, as in TRL);
    * ``"none"``: no division (``eps`` unused).

    NaN rewards are excluded from the means and stds and get advantage 0. A group with fewer than two valid
    rewards carries no relative signal, so all its advantages are 0.

    Args:
        rewards: Per-completion rewards, shape ``(N,)``, ordered group by group.
        group_size: Completions per prompt.
        scale: Which std to divide by.
        eps: Added to the std to keep groups of equal rewards finite.

    Returns:
        Advantages, shape ``(N,)``, dtype float32 or the rewards' floating dtype.

    Raises:
        ValueError: On a bad shape, a group size that does not divide ``N`` or an unknown ``scale``.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = _grouped(rewards, group_size)  # (G, n)
    valid = ~torch.isnan(grouped)
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))
    count = valid.sum(dim=1, keepdim=True)  # (G, 1)
    mean = filled.sum(dim=1, keepdim=True) / count.clamp(min=1)  # (G, 1)
    adv = filled - mean
    if scale == "group":
        adv = adv / (_unbiased_std(filled, valid, mean, count, dim=1) + eps)
    elif scale == "batch":
        flat_valid = valid.reshape(-1)
        n_valid = flat_valid.sum()
        batch_mean = filled.reshape(-1).sum() / n_valid.clamp(min=1)
        adv = adv / (_unbiased_std(filled, valid, batch_mean, n_valid, dim=None) + eps)
    keep = valid & (count >= 2)
    return torch.where(keep, adv, torch.zeros_like(adv)).reshape(-1)


def valid_reward_mask(rewards: Tensor) -> Tensor:
    """Mask of the completions whose reward could be computed (not NaN), shape ``(N,)`` bool."""
    return ~torch.isnan(rewards)


def overlong_penalty(lengths: Tensor, max_length: int, cache_length: int) -> Tensor:
    """Soft overlong punishment of DAPO, added to the task reward.

    With ``L_max = max_length`` and ``L_cache = cache_length``:
    ``0`` if ``|y| <= L_max - L_cache``; ``((L_max - L_cache) - |y|) / L_cache`` inside the cache (falling
    linearly from 0 to -1); ``-1`` beyond ``L_max``.

    Args:
        lengths: Completion lengths in tokens (or actions), shape ``(N,)``.
        max_length: ``L_max``, the generation budget.
        cache_length: ``L_cache``, the width of the soft zone, ``0 < L_cache <= L_max``.

    Returns:
        Penalties in ``[-1, 0]``, shape ``(N,)`` float.

    Raises:
        ValueError: If the lengths are not sane.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    lengths = lengths.to(torch.float32)
    threshold = max_length - cache_length
    soft = (threshold - lengths) / cache_length
    penalty = torch.where(lengths <= threshold, torch.zeros_like(lengths), soft)
    return torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)


def dynamic_sampling_mask(rewards: Tensor, group_size: int, atol: float = 0.0) -> Tensor:
    """DAPO dynamic sampling: which completions belong to a group whose rewards differ.

    A group whose valid rewards are all equal (within ``atol``), or that has fewer than two valid rewards, has
    zero advantage everywhere and only dilutes the batch; DAPO drops such groups and samples more prompts.

    Args:
        rewards: Per-completion rewards, shape ``(N,)``, ordered group by group; NaN = unscored.
        group_size: Completions per prompt.
        atol: Rewards closer than this count as equal.

    Returns:
        Keep mask, shape ``(N,)`` bool, constant within each group (``mask.view(-1, group_size)[:, 0]`` is the
        per-group flag).
    """
    grouped = _grouped(rewards.float(), group_size)  # (G, n)
    valid = ~torch.isnan(grouped)
    big = torch.finfo(grouped.dtype).max
    hi = torch.where(valid, grouped, torch.full_like(grouped, -big)).max(dim=1).values
    lo = torch.where(valid, grouped, torch.full_like(grouped, big)).min(dim=1).values
    keep = (valid.sum(dim=1) >= 2) & ((hi - lo) > atol)  # (G,)
    return keep.repeat_interleave(group_size)


def completion_mask_from_eos(is_eos: Tensor) -> Tensor:
    """Mask of the tokens up to and including each row's first EOS (every token if a row has none).

    Args:
        is_eos: Whether each generated token is an end-of-sequence token, shape ``(B, T)`` bool.

    Returns:
        Completion mask, shape ``(B, T)`` bool.
    """
    is_eos = is_eos.bool()
    steps = torch.arange(is_eos.shape[1], device=is_eos.device).expand_as(is_eos)  # (B, T)
    first = torch.where(is_eos, steps, torch.full_like(steps, is_eos.shape[1])).min(dim=1, keepdim=True).values
    return steps <= first


def truncation_mask(is_eos: Tensor, completion_mask: Tensor | None = None) -> Tensor:
    """Completion mask with truncated completions (no EOS within the mask) zeroed out.

    This is ``mask_truncated_completions`` (DAPO): a completion cut off by the length budget has no final
    answer, so its reward is noise and it is excluded from the loss entirely.

    Args:
        is_eos: Whether each generated token is an end-of-sequence token, shape ``(B, T)`` bool.
        completion_mask: The completion mask to restrict, shape ``(B, T)``; default
            :func:`completion_mask_from_eos`.

    Returns:
        The restricted mask, shape ``(B, T)``, same dtype as ``completion_mask`` (bool by default).
    """
    is_eos = is_eos.bool()
    if completion_mask is None:
        completion_mask = completion_mask_from_eos(is_eos)
    if completion_mask.shape != is_eos.shape:
        raise ValueError(f"is_eos {tuple(is_eos.shape)} and completion_mask {tuple(completion_mask.shape)} differ")
    finished = (is_eos & completion_mask.bool()).any(dim=1, keepdim=True)  # (B, 1)
    return completion_mask * finished.to(completion_mask.dtype)
