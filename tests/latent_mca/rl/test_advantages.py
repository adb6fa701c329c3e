"""Group-relative advantages and the DAPO helpers, checked against hand-computed values."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from latent_mca.rl.advantages import (
    DEFAULT_SCALE,
    completion_mask_from_eos,
    dynamic_sampling_mask,
    group_advantages,
    overlong_penalty,
    truncation_mask,
    valid_reward_mask,
)

NAN = math.nan


def expected(rewards: list[float], group_size: int, scale: str, eps: float = 1e-4) -> list[float]:
    """Reference computation with plain Python and `statistics` (sample std, n - 1)."""
    valid_all = [r for r in rewards if not math.isnan(r)]
    batch_std = statistics.stdev(valid_all) if len(valid_all) >= 2 else 0.0
    out = []
    for g in range(0, len(rewards), group_size):
        group = rewards[g:g + group_size]
        valid = [r for r in group if not math.isnan(r)]
        if len(valid) < 2:
            out += [0.0] * len(group)
            continue
        mean = sum(valid) / len(valid)
        std = {"group": statistics.stdev(valid), "batch": batch_std, "none": None}[scale]
        for r in group:
            if math.isnan(r):
                out.append(0.0)
            else:
                out.append((r - mean) if std is None else (r - mean) / (std + eps))
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_reference_without_nan(scale):
    rewards = [1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 2.5, 7.0, 4.0, 4.0, 4.0, 4.0]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, scale)
    assert got.tolist() == pytest.approx(expected(rewards, 4, scale), rel=1e-12)


def test_hand_computed_group_values():
    # group 1: mean 2, sample std 1 -> (-1, 0, 1) / (1 + 1e-4); group 2: all equal -> 0
    got = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0]), 3)
    d = 1 / (1 + 1e-4)
    assert got.tolist() == pytest.approx([-d, 0.0, d, 0.0, 0.0, 0.0])


def test_matches_torch_std_formula_used_by_trl():
    rewards = torch.tensor([0.3, 1.2, 0.9, 2.0, 5.0, 1.0, 1.5, 0.2])
    grouped = rewards.view(2, 4)
    trl_style = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)
    assert torch.allclose(group_advantages(rewards, 4), trl_style)
    batch_style = ((grouped - grouped.mean(1, keepdim=True)) / (rewards.std() + 1e-4)).reshape(-1)
    assert torch.allclose(group_advantages(rewards, 4, "batch"), batch_style)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_nan_rewards_are_excluded_and_get_zero(scale):
    rewards = [1.0, NAN, 3.0, 5.0, NAN, 2.0, NAN, NAN, NAN, NAN, NAN, NAN, 0.0, 1.0, 1.0, 4.0]
    got = group_advantages(torch.tensor(rewards), 4, scale)
    assert not torch.isnan(got).any()
    assert got.tolist() == pytest.approx(expected(rewards, 4, scale), rel=1e-5)
    # group 1: valid (1, 3, 5): mean 3, std 2
    if scale == "group":
        assert got[:4].tolist() == pytest.approx([-2 / 2.0001, 0.0, 0.0, 2 / 2.0001])
    assert got[4:12].tolist() == [0.0] * 8  # one valid reward, then none
    assert valid_reward_mask(torch.tensor(rewards)).tolist() == [not math.isnan(r) for r in rewards]


def test_group_size_one_and_bad_inputs():
    assert group_advantages(torch.tensor([1.0, 2.0]), 1).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, "std")
    assert group_advantages(torch.tensor([1, 3]), 2).dtype.is_floating_point


def test_default_scale_per_algorithm():
    assert DEFAULT_SCALE == {"grpo": "group", "bnpo": "group", "dr_grpo": "none", "dapo": "group"}


def test_overlong_penalty_formula():
    # L_max = 10, L_cache = 4: free up to 6, linear to -1 at 10, -1 beyond
    got = overlong_penalty(torch.tensor([0, 6, 7, 8, 10, 11, 50]), max_length=10, cache_length=4)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0])
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(torch.tensor([1]), max_length=4, cache_length=5)


def test_dynamic_sampling_mask_keeps_groups_with_spread():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, NAN, 2.0, 2.0, NAN, NAN, 3.0, NAN, 1.0, 2.0])
    keep = dynamic_sampling_mask(rewards, 3)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False] * 3 + [True] * 3 + [False] * 6 + [True] * 3
    near = torch.tensor([1.0, 1.0 + 1e-9, 0.0, 0.5])
    assert dynamic_sampling_mask(near, 2, atol=1e-6).tolist() == [False, False, True, True]


def test_completion_and_truncation_masks():
    is_eos = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert completion_mask_from_eos(is_eos).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncation_mask(is_eos).int().tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    # an EOS outside the given mask does not count as finished
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    eos = torch.tensor([[0, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    out = truncation_mask(eos, mask)
    assert out.dtype == torch.float32
    assert out.tolist() == [[0.0] * 4, [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
