import json
import math
from dataclasses import asdict

import pytest
import torch

from latent_mca.models.policy import LatentPolicy, LatentPolicyConfig, code_logprobs, sample_codes

D, K = 32, 16
NEG_INF = float("-inf")


def make():
    torch.manual_seed(0)
    return LatentPolicy(LatentPolicyConfig(hidden_size=D, num_layers=2, num_heads=4, num_codes=K)).eval()


def test_config_defaults_follow_the_paper_and_round_trip():
    cfg = LatentPolicyConfig(hidden_size=2048)
    assert (cfg.num_layers, cfg.num_codes, cfg.num_heads) == (8, 128, 32)
    assert LatentPolicyConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg


@torch.no_grad()
def test_policy_does_not_see_the_future():
    policy = make()
    x = torch.randn(2, 6, D)
    t = 2
    changed = x.clone()
    changed[:, t + 1] += torch.randn(2, D)
    a, b = policy(x), policy(changed)
    assert a.shape == (2, 6, K)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1] - b[:, t + 1]).abs().amax() > 1e-3


@torch.no_grad()
def test_cached_decoding_equals_full_forward():
    policy = make()
    prompt = torch.randn(3, 4, D)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    new = torch.randn(3, 3, D)
    logits, cache = policy.prefill(prompt, mask)
    cache = cache.repeat_interleave(2)
    new2 = new.repeat_interleave(2, dim=0)
    steps = []
    for j in range(3):
        step_logits, cache = policy.step(new2[:, j:j + 1], cache)
        steps.append(step_logits)
    full = policy(torch.cat([prompt, new], 1), torch.cat([mask, torch.ones(3, 3, dtype=mask.dtype)], 1))
    real = mask.bool()
    torch.testing.assert_close(logits[real], full[:, :4][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 4:].repeat_interleave(2, dim=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings", [
    dict(), dict(temperature=0.7), dict(top_k=3), dict(top_p=0.6), dict(temperature=1.5, top_k=5, top_p=0.8),
])
def test_sampled_logp_equals_recomputed_logp(settings):
    torch.manual_seed(0)
    logits = torch.randn(4, 5, K)
    codes, logp = sample_codes(logits, **settings)
    assert codes.shape == logp.shape == (4, 5)
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp, code_logprobs(logits, codes, **settings))


def test_truncation_excludes_codes_hand_computed():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    codes = torch.arange(4)
    cases = {
        "top_k=2": (dict(top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
        "top_p=0.6": (dict(top_p=0.6), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),  # 0.5 < 0.6 <= 0.5 + 0.3
        "top_p=0.45": (dict(top_p=0.45), [1, 0, 0, 0]),
        "top_p=0.9": (dict(top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        "top_k=3,top_p=0.6": (dict(top_k=3, top_p=0.6), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
    }
    for name, (settings, expected) in cases.items():
        expected = torch.tensor([math.log(p) if p > 0 else NEG_INF for p in expected])
        got = code_logprobs(logits.expand(4, 4), codes, **settings)
        torch.testing.assert_close(got, expected, msg=name)
    # Temperature 2 on the full distribution: log_softmax(logits / 2), written out.
    tempered = probs.sqrt() / probs.sqrt().sum()
    torch.testing.assert_close(code_logprobs(logits.expand(4, 4), codes, temperature=2.0), tempered.log())


def test_sampling_never_draws_excluded_codes_and_matches_the_processed_law():
    torch.manual_seed(0)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(30000, 4)
    codes, logp = sample_codes(logits, top_k=3)
    freq = torch.bincount(codes, minlength=4).float() / codes.numel()
    torch.testing.assert_close(freq, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]), rtol=0, atol=0.01)
    codes, _ = sample_codes(logits, top_p=0.65)
    assert set(codes.unique().tolist()) == {0, 1}


def test_greedy_generator_and_gradients():
    logits = torch.randn(3, K, requires_grad=True)
    codes, logp = sample_codes(logits, temperature=0.0)
    assert torch.equal(codes, logits.argmax(-1)) and (logp == 0).all()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(sample_codes(logits, generator=g1)[0], sample_codes(logits, generator=g2)[0])
    codes, _ = sample_codes(logits, top_k=4)
    code_logprobs(logits, codes, top_k=4).sum().backward()
    assert torch.isfinite(logits.grad).all()
    kept = logits.topk(4, dim=-1).indices
    outside = torch.ones_like(logits, dtype=torch.bool).scatter(-1, kept, False)
    assert (logits.grad[outside] == 0).all() and logits.grad.abs().sum() > 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="top_p"):
        sample_codes(torch.randn(2, K), top_p=0.0)
    with pytest.raises(ValueError, match="codes shape"):
        code_logprobs(torch.randn(2, K), torch.zeros(3, dtype=torch.long))
