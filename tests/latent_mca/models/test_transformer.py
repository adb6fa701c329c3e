import json
from dataclasses import asdict

import pytest
import torch

from latent_mca.models.transformer import CausalTransformer, CausalTransformerConfig, swiglu_hidden_size

D = 32


def make(num_kv_heads=None, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = CausalTransformerConfig(hidden_size=D, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads, **kw)
    return CausalTransformer(cfg).eval()


def left_pad(rows):
    """Stack sequences (L_i, d) into a left-padded (B, L, d) batch and its mask."""
    n = max(r.shape[0] for r in rows)
    x = torch.zeros(len(rows), n, D)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, n - r.shape[0]:] = r
        mask[i, n - r.shape[0]:] = 1
    return x, mask


def test_config_resolves_defaults_and_round_trips_through_json():
    cfg = CausalTransformerConfig(hidden_size=128, num_layers=3)
    assert cfg.num_heads == 2 and cfg.num_kv_heads == 2  # head width 64
    assert cfg.intermediate_size == swiglu_hidden_size(128) == 384  # 8/3 * 128 = 341.3 -> multiple of 64
    again = CausalTransformerConfig(**json.loads(json.dumps(asdict(cfg))))
    assert again == cfg
    with pytest.raises(ValueError, match="num_heads"):
        CausalTransformerConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        CausalTransformerConfig(hidden_size=32, num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("num_kv_heads", [None, 2])
@torch.no_grad()
def test_output_at_t_depends_only_on_inputs_up_to_t(num_kv_heads):
    model = make(num_kv_heads)
    x = torch.randn(2, 7, D)
    t = 3
    changed = x.clone()
    changed[:, t + 1] += torch.randn(2, D)
    y, y2 = model(x), model(changed)
    torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1], rtol=0, atol=1e-6)
    assert (y[:, t + 1:] - y2[:, t + 1:]).abs().amax() > 1e-3


@pytest.mark.parametrize("num_kv_heads", [None, 2])
@torch.no_grad()
def test_left_padding_matches_unpadded_and_padded_rows_are_zero_and_finite(num_kv_heads):
    model = make(num_kv_heads)
    rows = [torch.randn(5, D), torch.randn(2, D), torch.randn(7, D)]
    x, mask = left_pad(rows)
    y = model(x, mask)
    assert torch.isfinite(y).all()
    assert (y[mask == 0] == 0).all()
    for i, r in enumerate(rows):
        alone = model(r[None])[0]
        torch.testing.assert_close(y[i, -r.shape[0]:], alone, rtol=1e-5, atol=1e-5)


def test_gradients_are_finite_with_fully_padded_prefix():
    model = make()
    x, mask = left_pad([torch.randn(6, D), torch.randn(1, D)])
    x.requires_grad_(True)
    model(x, mask).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("num_kv_heads", [None, 2])
@torch.no_grad()
def test_prefill_then_steps_equals_full_forward(num_kv_heads):
    model = make(num_kv_heads)
    prompts = [torch.randn(4, D), torch.randn(2, D)]
    x, mask = left_pad(prompts)
    new = torch.randn(2, 3, D)
    y_prompt, cache = model.prefill(x, mask)
    steps = []
    for j in range(new.shape[1]):
        y_t, cache = model.step(new[:, j:j + 1], cache)
        steps.append(y_t)
    full_x = torch.cat([x, new], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1)
    full = model(full_x, full_mask)
    torch.testing.assert_close(y_prompt, full[:, : x.shape[1]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, x.shape[1]:], rtol=1e-5, atol=1e-5)
    assert cache.length == full_x.shape[1]
    assert cache.next_position.tolist() == [4 + 3, 2 + 3]


@torch.no_grad()
def test_repeat_interleaved_cache_equals_prefilling_repeated_inputs():
    model = make(2)
    x, mask = left_pad([torch.randn(3, D), torch.randn(5, D)])
    new = torch.randn(6, 2, D)  # 3 samples per prompt, each with its own continuation
    _, cache = model.prefill(x, mask)
    cache = cache.repeat_interleave(3)
    _, ref_cache = model.prefill(x.repeat_interleave(3, dim=0), mask.repeat_interleave(3, dim=0))
    for j in range(new.shape[1]):
        y, cache = model.step(new[:, j:j + 1], cache)
        y_ref, ref_cache = model.step(new[:, j:j + 1], ref_cache)
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    # Samples of one prompt see the same prefix but different continuations.
    assert (y[0] - y[1]).abs().amax() > 1e-3


@torch.no_grad()
def test_step_does_not_modify_the_previous_cache():
    model = make()
    _, cache = model.prefill(torch.randn(2, 3, D))
    keys_before = [k.clone() for k in cache.keys]
    model.step(torch.randn(2, 1, D), cache)
    assert cache.length == 3
    assert all(torch.equal(a, b) for a, b in zip(keys_before, cache.keys))


def test_step_rejects_a_wrong_shape():
    model = make()
    _, cache = model.prefill(torch.randn(2, 3, D))
    with pytest.raises(ValueError, match="x_t"):
        model.step(torch.randn(2, 2, D), cache)
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randn(2, 3, D), torch.ones(2, 4))


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 5, D)
    grads = []
    for ckpt in (False, True):
        model = make(gradient_checkpointing=ckpt).train()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
