import json
from dataclasses import asdict

import pytest
import torch

from latent_mca.models.kv_cache import fast_linear
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


def naive_forward(legacy, x, num_heads, num_kv_heads, eps=1e-6, theta=10000.0):
    """One unpadded sequence ``(L, d)`` through the blocks, written from the formulas with separate q/k/v/gate/up."""
    n, d = x.shape
    hd = d // num_heads
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(n).float()[:, None] * inv  # (L, hd/2)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rope(t):  # (H, L, hd), rotate-half convention
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    i = 0
    while f"layers.{i}.attn.q_proj.weight" in legacy:
        w = {k[len(f"layers.{i}."):]: v for k, v in legacy.items() if k.startswith(f"layers.{i}.")}
        h = rms(x, w["attn_norm.weight"])
        q = rope((h @ w["attn.q_proj.weight"].T).view(n, num_heads, hd).transpose(0, 1))
        k = rope((h @ w["attn.k_proj.weight"].T).view(n, num_kv_heads, hd).transpose(0, 1))
        v = (h @ w["attn.v_proj.weight"].T).view(n, num_kv_heads, hd).transpose(0, 1)
        k, v = (t.repeat_interleave(num_heads // num_kv_heads, dim=0) for t in (k, v))
        scores = (q @ k.transpose(1, 2)) / hd ** 0.5 + torch.full((n, n), float("-inf")).triu(1)
        a = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, d) @ w["attn.o_proj.weight"].T
        x = x + a
        h = rms(x, w["mlp_norm.weight"])
        x = x + (torch.nn.functional.silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)) @ \
            w["mlp.down_proj.weight"].T
        i += 1
    return rms(x, legacy["norm.weight"])


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_checkpoints_with_separate_projections_load_and_match_the_formulas(num_kv_heads):
    torch.manual_seed(1)
    kv = num_kv_heads or 4
    hd, hidden = D // 4, swiglu_hidden_size(D)
    legacy = {"norm.weight": 1 + 0.1 * torch.randn(D)}
    for i in range(2):
        shapes = {"attn.q_proj": (4 * hd, D), "attn.k_proj": (kv * hd, D), "attn.v_proj": (kv * hd, D),
                  "attn.o_proj": (D, D), "mlp.gate_proj": (hidden, D), "mlp.up_proj": (hidden, D),
                  "mlp.down_proj": (D, hidden)}
        legacy.update({f"layers.{i}.{k}.weight": torch.randn(s) / s[1] ** 0.5 for k, s in shapes.items()})
        legacy.update({f"layers.{i}.{k}.weight": 1 + 0.1 * torch.randn(D) for k in ("attn_norm", "mlp_norm")})
    model = make(num_kv_heads)
    model.load_state_dict(legacy, strict=True)
    keys = model.state_dict()
    assert "layers.0.attn.qkv_proj.weight" in keys and "layers.0.mlp.gate_up_proj.weight" in keys
    x = torch.randn(6, D)
    with torch.no_grad():
        torch.testing.assert_close(model(x[None])[0], naive_forward(legacy, x, 4, kv), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_preallocated_cache_grows_and_equals_the_plain_cache():
    model = make(2)
    x, mask = left_pad([torch.randn(4, D), torch.randn(2, D)])
    new = torch.randn(2, 7, D)
    _, plain = model.prefill(x, mask)
    _, fast = model.prefill(x, mask, max_length=6)  # room for 2 steps, then the buffers double
    assert plain.store is None and fast.store is not None and fast.store.capacity == 6
    capacities = []
    for j in range(new.shape[1]):
        with torch.enable_grad():  # gradients enabled: concatenation, a new plain cache every step
            y_plain, plain = model.step(new[:, j:j + 1], plain)
        y_fast, fast = model.step(new[:, j:j + 1], fast)
        capacities.append(fast.store.capacity)
        torch.testing.assert_close(y_fast, y_plain, rtol=1e-6, atol=1e-6)
    assert plain.store is None and capacities == [6, 6, 12, 12, 12, 12, 12, 24][: new.shape[1]]
    assert fast.length == plain.length == 11 and fast.next_position.tolist() == plain.next_position.tolist()
    for a, b in zip(fast.keys + fast.values, plain.keys + plain.values):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_stepping_one_cache_twice_branches_without_overwriting():
    model = make()
    x = torch.randn(2, 3, D)
    a_in, b_in, c_in = torch.randn(2, 1, D), torch.randn(2, 1, D), torch.randn(2, 1, D)
    _, cache = model.prefill(x, max_length=8)
    _, after_a = model.step(a_in, cache)
    y_b, after_b = model.step(b_in, cache)  # same parent: must copy, not overwrite position 3 of branch a
    y_a2, _ = model.step(c_in, after_a)
    assert after_b.store is not after_a.store and cache.length == 3
    torch.testing.assert_close(y_a2, model(torch.cat([x, a_in, c_in], 1))[:, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_b, model(torch.cat([x, b_in], 1))[:, -1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_extend_after_a_repeated_prefill_equals_repeated_full_passes_with_gradients(num_kv_heads):
    model = make(num_kv_heads).train()  # dropout 0: train mode changes nothing but must not break anything
    prompt, pmask = left_pad([torch.randn(4, D), torch.randn(2, D)])
    new = torch.randn(4, 3, D)  # 2 continuations per prompt
    new_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])  # right padding after an end
    outs, grads = [], []
    for once in (True, False):
        model.zero_grad()
        p = prompt.clone().requires_grad_(True)
        if once:
            _, cache = model.prefill(p, pmask)
            y, cache = model.extend(new, cache.repeat_interleave(2), new_mask)
            assert cache.length == 7 and cache.next_position.tolist() == [7, 5, 4, 5]
        else:
            full = torch.cat([p.repeat_interleave(2, dim=0), new], 1)
            y = model(full, torch.cat([pmask.repeat_interleave(2, dim=0), new_mask], 1))[:, 4:]
        (y * torch.linspace(-1, 1, D)).sum().backward()
        outs.append(y.detach())
        grads.append([p.grad.clone()] + [w.grad.clone() for w in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert (outs[0][new_mask == 0] == 0).all()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fast_linear_equals_the_layer_and_follows_weight_updates():
    layer = torch.nn.Linear(D, 3 * D)
    x = torch.randn(4, 1, D)
    with torch.no_grad():
        torch.testing.assert_close(fast_linear(layer, x), layer(x), rtol=1e-6, atol=1e-6)
        layer.weight.mul_(2.0)  # an in-place update (like an optimiser step) must invalidate the cached copy
        torch.testing.assert_close(fast_linear(layer, x), layer(x), rtol=1e-6, atol=1e-6)
        handle = layer.register_forward_hook(lambda module, args, out: out * 0)  # hooks are never bypassed
        assert (fast_linear(layer, x) == 0).all()
        handle.remove()
    y = fast_linear(layer, x)  # gradients enabled: the layer itself
    y.sum().backward()
    assert layer.weight.grad is not None


def test_fast_linear_keeps_no_copy_of_a_large_weight(monkeypatch):
    import latent_mca.models.kv_cache as kv_cache

    small, large = torch.nn.Linear(D, D, bias=False), torch.nn.Linear(D, 4 * D, bias=False)
    monkeypatch.setattr(kv_cache, "FAST_LINEAR_MAX_WEIGHT", D * D)
    with torch.no_grad():
        for layer in (small, large):
            torch.testing.assert_close(fast_linear(layer, torch.ones(2, D)), layer(torch.ones(2, D)))
    assert "_fast_weight" in small.__dict__ and "_fast_weight" not in large.__dict__


@torch.no_grad()
def test_extend_writes_into_a_preallocated_cache_and_matches_the_full_pass():
    model = make(2)
    x, mask = left_pad([torch.randn(3, D), torch.randn(5, D)])
    new, new_mask = torch.randn(2, 4, D), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    _, cache = model.prefill(x, mask, max_length=7)  # too small for 4 more: the store grows
    y, cache = model.extend(new, cache, new_mask)
    assert cache.store is not None and cache.store.capacity >= 9 and cache.length == 9
    full = model(torch.cat([x, new], 1), torch.cat([mask, new_mask], 1))
    torch.testing.assert_close(y, full[:, 5:], rtol=1e-5, atol=1e-5)
    y_next, _ = model.step(torch.ones(2, 1, D), cache)
    full = model(torch.cat([x, new, torch.ones(2, 1, D)], 1), torch.cat([mask, new_mask, torch.ones(2, 1)], 1))
    torch.testing.assert_close(y_next, full[:, -1:], rtol=1e-5, atol=1e-5)
