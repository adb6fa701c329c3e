import math

import pytest
import torch

from latent_mca.rl.dynamic import GroupRefill


def buffer(max_batches=3):
    """Payloads are plain tensors of row ids; groups of 2."""
    def select(payload, groups):
        rows = (groups[:, None] * 2 + torch.arange(2)).flatten()
        return payload[rows]

    return GroupRefill(2, max_batches, select=select, cat=torch.cat)


def add(buf, ids, rewards):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    buf.add(torch.tensor(ids), rewards, torch.arange(len(ids)) + 1, torch.ones(len(ids), dtype=torch.bool))


def test_keeps_only_groups_with_a_reward_spread_until_a_batch_is_full():
    buf = buffer()
    add(buf, [0, 1, 2, 3], [1.0, 1.0, 0.0, 1.0])  # group 0 ties: dropped
    assert buf.kept_groups == 1 and not buf.ready(2)
    add(buf, [4, 5, 6, 7], [0.5, math.nan, 0.2, 0.9])  # group 0 has one valid reward: dropped
    assert buf.kept_groups == 2 and buf.ready(2)
    out = buf.pop(2)
    assert out.payload.tolist() == [2, 3, 6, 7]
    assert out.rewards.tolist() == pytest.approx([0.0, 1.0, 0.2, 0.9])
    assert out.lengths.tolist() == [3, 4, 3, 4]
    valid = [1.0, 1.0, 0.0, 1.0, 0.5, 0.2, 0.9]
    assert out.stats["reward"] == pytest.approx(sum(valid) / len(valid))  # every sampled completion counts
    assert out.stats["groups_kept"] == 0.5 and out.stats["sampling_batches"] == 2
    assert out.stats["groups_short"] == 0
    assert buf.batches == 0 and buf.kept_groups == 0  # emptied


def test_surplus_groups_are_dropped_and_the_batch_limit_bounds_the_wait():
    buf = buffer(max_batches=2)
    add(buf, [0, 1, 2, 3, 4, 5], [0, 1, 1, 0, 0, 1])
    out = buf.pop(2)
    assert out.payload.tolist() == [0, 1, 2, 3] and out.rewards.numel() == 4
    add(buf, [0, 1], [1, 1])
    assert not buf.ready(1)
    add(buf, [2, 3], [0, 1])
    assert buf.ready(3)  # two batches drawn: the limit, though only one group is kept
    out = buf.pop(3)
    assert out.payload.tolist() == [2, 3] and out.stats["groups_short"] == 2


def test_nothing_kept_gives_a_masked_placeholder_group():
    buf = buffer(max_batches=1)
    add(buf, [8, 9, 10, 11], [0.3, 0.3, 1.0, 1.0])
    assert buf.ready(2)
    out = buf.pop(2)
    assert out.payload.tolist() == [8, 9] and torch.isnan(out.rewards).all()
    assert out.stats["groups_kept"] == 0 and out.stats["groups_short"] == 2


def test_rejects_a_zero_batch_limit():
    with pytest.raises(ValueError, match="dynamic_sampling_max_batches"):
        buffer(max_batches=0)
