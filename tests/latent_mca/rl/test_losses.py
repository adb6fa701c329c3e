"""GRPO-family losses against element-by-element Python computations and hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from latent_mca.rl.losses import aggregate, policy_loss

ALGOS = ["grpo", "bnpo", "dr_grpo", "dapo"]


def reference_loss(logp, old, ref, adv, mask, algorithm, eps_low, eps_high, beta, max_len=None, items=None, world=1):
    """Plain-Python loops over every element."""
    B, T = len(logp), len(logp[0])
    per = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            r = math.exp(logp[b][t] - old[b][t])
            r_clip = min(max(r, 1 - eps_low), 1 + eps_high)
            loss = -min(r * adv[b], r_clip * adv[b])
            if beta:
                d = ref[b][t] - logp[b][t]
                loss += beta * (math.exp(d) - d - 1)
            per[b][t] = loss
    total = sum(sum(row) for row in per)
    n_tokens = sum(sum(1 for m in row if m) for row in mask)
    if algorithm == "grpo":
        return sum(sum(per[b]) / max(sum(1 for m in mask[b] if m), 1) for b in range(B)) / B
    if algorithm == "bnpo":
        return total / max(n_tokens, 1)
    if algorithm == "dr_grpo":
        return total / (B * max_len)
    return total / ((n_tokens if items is None else items) / world)


def case():
    """Ratios beyond both clip bounds with positive and negative advantages, and an all-padding row."""
    ratios = [[1.5, 0.5, 1.0, 1.0], [1.5, 0.5, 1.0, 1.0], [1.0] * 4, [1.0, 1.0, 1.0, 1.0]]
    mask = [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    adv = [1.0, -2.0, 0.7, 0.5]
    old = [[0.1 * (b + t) - 1.0 for t in range(4)] for b in range(4)]
    logp = [[old[b][t] + math.log(ratios[b][t]) for t in range(4)] for b in range(4)]
    ref = [[logp[b][t] + 0.3 * ((b + 2 * t) % 3 - 1) for t in range(4)] for b in range(4)]
    return logp, old, ref, adv, mask


def tensors(logp, old, ref, adv, mask):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return t(logp), t(old), t(ref), t(adv), t(mask)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_matches_elementwise_reference(algorithm, beta):
    logp, old, ref, adv, mask = case()
    lp, o, r, a, m = tensors(logp, old, ref, adv, mask)
    kwargs = dict(max_completion_length=5) if algorithm == "dr_grpo" else {}
    loss, stats = policy_loss(lp, o, r, a, m, algorithm=algorithm, beta=beta, **kwargs)
    eps_high = 0.28 if algorithm == "dapo" else 0.2
    want = reference_loss(logp, old, ref, adv, mask, algorithm, 0.2, eps_high, beta, max_len=5)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    kl = [math.exp(ref[b][t] - logp[b][t]) - (ref[b][t] - logp[b][t]) - 1
          for b in range(4) for t in range(4) if mask[b][t]]
    assert stats["kl"].item() == pytest.approx(sum(kl) / len(kl), rel=1e-10)


def test_hand_worked_numbers():
    # Valid tokens: row 0 (A=1): r = 1.5, 0.5, 1.0; row 1 (A=-2): r = 1.5, 0.5; row 3 (A=0.5): r = 1.
    # eps 0.2: row 0 losses -1.2 (clipped high), -0.5, -1.0; row 1: 3.0, 1.6 (clipped low); row 3: -0.5.
    lp, o, r, a, m = tensors(*case())
    grpo, stats = policy_loss(lp, o, r, a, m, algorithm="grpo")
    assert grpo.item() == pytest.approx((-2.7 / 3 + 4.6 / 2 + 0.0 - 0.5) / 4)  # 0.225
    assert policy_loss(lp, o, r, a, m, algorithm="bnpo")[0].item() == pytest.approx(1.4 / 6)
    dr = policy_loss(lp, o, r, a, m, algorithm="dr_grpo", max_completion_length=5)[0]
    assert dr.item() == pytest.approx(1.4 / 20)
    # dapo: eps_high 0.28 -> row 0 first token -1.28; total 1.32 over 24 global tokens shared by 2 ranks
    dapo = policy_loss(lp, o, r, a, m, algorithm="dapo", num_items_in_batch=24, world_size=2)[0]
    assert dapo.item() == pytest.approx(1.32 / 12)
    assert policy_loss(lp, o, r, a, m, algorithm="dapo")[0].item() == pytest.approx(1.32 / 6)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 6)  # 1.5 with A > 0
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 6)  # 0.5 with A < 0
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(2 / 6)


def test_explicit_epsilon_high_overrides_default():
    lp, o, r, a, m = tensors(*case())
    loss = policy_loss(lp, o, None, a, m, algorithm="grpo", epsilon_low=0.2, epsilon_high=0.4)[0]
    # row 0 first token: r = 1.5 -> clipped at 1.4
    assert loss.item() == pytest.approx((-2.9 / 3 + 4.6 / 2 - 0.5) / 4)


def normaliser(algorithm, mask, max_len, items, world):
    B = mask.shape[0]
    if algorithm == "grpo":
        return B * mask.sum(1, keepdim=True).clamp(min=1)
    if algorithm == "bnpo":
        return mask.sum()
    if algorithm == "dr_grpo":
        return torch.tensor(float(B * max_len))
    return torch.tensor(items / world)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_on_policy_gradient_is_advantage_weighted_score(algorithm):
    torch.manual_seed(0)
    logp = (-torch.rand(4, 6, dtype=torch.float64) * 3).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0] * 6, [1, 0, 0, 0, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([0.7, -1.3, 2.0, 0.4], dtype=torch.float64)
    loss, _ = policy_loss(logp, None, None, adv, mask, algorithm=algorithm, max_completion_length=8,
                          num_items_in_batch=30, world_size=3)
    loss.backward()
    want = -adv[:, None] * mask / normaliser(algorithm, mask, 8, 30, 3)
    assert torch.allclose(logp.grad, want)
    assert loss.item() == pytest.approx((-adv[:, None] * mask / normaliser(algorithm, mask, 8, 30, 3)).sum().item())


def test_padding_garbage_never_leaks():
    logp = torch.tensor([[-1.0, float("-inf")], [float("nan"), float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.2, float("nan")], [0.0, float("inf")]])
    ref = torch.tensor([[-0.9, float("inf")], [float("-inf"), 1.0]])
    mask = torch.tensor([[1, 0], [0, 0]])
    adv = torch.tensor([1.0, 0.0])
    for algorithm in ALGOS:
        loss, stats = policy_loss(logp, old, ref, adv, mask, algorithm=algorithm, beta=0.1,
                                  max_completion_length=2)
        grad, = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad[0, 1] == 0 and (grad[1] == 0).all()
        assert all(torch.isfinite(v) for v in stats.values())


def test_all_padding_batch_gives_zero_not_nan():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    for algorithm in ALGOS:
        loss, stats = policy_loss(logp, None, None, torch.ones(2), mask, algorithm=algorithm,
                                  max_completion_length=3)
        assert loss.item() == 0.0 and stats["ratio_mean"].item() == 0.0


def test_no_kl_stat_without_reference_and_beta_zero_ignores_kl():
    lp, o, r, a, m = tensors(*case())
    loss_no_ref, stats = policy_loss(lp, o, None, a, m, algorithm="bnpo")
    assert "kl" not in stats
    loss_ref, stats_ref = policy_loss(lp, o, r, a, m, algorithm="bnpo", beta=0.0)
    assert loss_ref.item() == loss_no_ref.item() and stats_ref["kl"].item() > 0


def test_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(x, None, None, torch.zeros(2), torch.ones(2, 3), algorithm="dr_grpo")
    with pytest.raises(ValueError, match="unknown algorithm"):
        policy_loss(x, None, None, torch.zeros(2), torch.ones(2, 3), algorithm="ppo")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, None, None, torch.zeros(3), torch.ones(2, 3), algorithm="grpo")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(x, None, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3), algorithm="grpo")
    with pytest.raises(ValueError, match="unknown algorithm"):
        aggregate(x, torch.ones(2, 3), "sum")
