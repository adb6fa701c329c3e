"""A small pre-norm causal transformer over backbone states, with RoPE and an incremental-decoding KV cache.

The inverse dynamics model and the latent policy are both stacks of these blocks on top of the frozen
backbone's final hidden states ``e`` (shape ``(B, L, d)``). Blocks follow the Llama/Qwen recipe (RMSNorm
pre-norm, rotary multi-head attention with optional grouped KV heads, SwiGLU MLP) but are written here, so the
modules do not depend on a transformers modeling file. Query, key and value share one projection, and so do
the SwiGLU gate and up projections (fewer, larger matrix products); checkpoints written with separate
``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` weights still load (they are fused on load).

Positions come from the attention mask (``cumsum(mask) - 1``), so left-padded and unpadded batches give the
same outputs on their real tokens. Attention is causal plus key padding; a padded query row is allowed to
attend to itself so that no softmax row is empty (an all-masked row would give NaN), and outputs at padded
positions are set to zero.

Decoding (:meth:`CausalTransformer.step`) under ``torch.no_grad()`` writes each new key and value in place
into buffers preallocated to a capacity (``prefill(..., max_length=...)``, else grown by doubling) instead of
concatenating the whole cache every step; see :class:`KVCache` for when that happens and why it is safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from latent_mca.models.kv_cache import KVCache, _KVStore, _Slot, fast_linear

__all__ = ["CausalTransformer", "CausalTransformerConfig", "KVCache", "build_causal_transformer", "fast_linear",
           "swiglu_hidden_size"]


def swiglu_hidden_size(input_size: int, multiple_of: int = 64) -> int:
    """Hidden width of a SwiGLU MLP: about 8/3 of its input width, rounded up to ``multiple_of``.

    8/3 keeps the parameter count of a 4x GELU MLP (SwiGLU has three matrices instead of two).
    """
    return multiple_of * math.ceil(8 * input_size / 3 / multiple_of)


@dataclass
class CausalTransformerConfig:
    """Sizes of a :class:`CausalTransformer`.

    ``None`` fields are resolved in ``__post_init__`` so a config saved as JSON rebuilds the same module.

    Attributes:
        hidden_size: Model width ``d`` (the backbone's hidden size).
        num_layers: Number of transformer blocks.
        num_heads: Attention heads. None: a head width of 64 when ``hidden_size`` is a multiple of 64, else one head.
        num_kv_heads: Key/value heads (grouped-query attention). None: ``num_heads``.
        intermediate_size: SwiGLU hidden width. None: :func:`swiglu_hidden_size` of ``hidden_size`` (~8/3 d).
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        dropout: Dropout on attention probabilities and on both residual branches.
        gradient_checkpointing: Recompute block activations in the backward pass while training.
    """

    hidden_size: int
    num_layers: int = 2
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size <= 0 or self.num_layers < 0:
            raise ValueError(f"CausalTransformerConfig: hidden_size must be > 0 and num_layers >= 0, got "
                             f"hidden_size={self.hidden_size}, num_layers={self.num_layers}")
        if self.num_heads is None:
            self.num_heads = self.hidden_size // 64 if self.hidden_size % 64 == 0 else 1
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = swiglu_hidden_size(self.hidden_size)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"CausalTransformerConfig: hidden_size={self.hidden_size} must split into "
                             f"num_heads={self.num_heads} heads of even width (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"CausalTransformerConfig: num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half convention) read from a per-position table.

    The table holds, for every position ``p`` and frequency ``f``, the factors ``C = [cos; cos]`` and
    ``S = [-sin; sin]`` over the two halves of a head, so that ``rope(x) = x * C + swap_halves(x) * S``
    without concatenating. It is built in float32 (the same values as evaluating the angles per call), cast
    to the activations' dtype and grown by doubling when a longer sequence arrives.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def table(self, length: int, like: Tensor) -> Tensor:
        """Factors for positions ``0 .. >= length-1``, shape ``(n, 2, 2, head_dim / 2)`` (``[C, S]`` per position)."""
        key = (like.device, like.dtype)
        table = self._tables.get(key)
        if table is None or table.shape[0] < length:
            n = max(length, 64 if table is None else 2 * table.shape[0])
            freqs = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)[:, None] * self.inv_freq
            cos, sin = freqs.cos(), freqs.sin()  # (n, hd/2)
            table = torch.stack([torch.stack([cos, cos], 1), torch.stack([-sin, sin], 1)], 1)  # (n, 2, 2, hd/2)
            table = table.to(device=like.device, dtype=like.dtype)
            self._tables[key] = table
        return table

    def forward(self, positions: Tensor, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """``C`` and ``S`` of shape ``(B, L, 1, 2, head_dim / 2)`` for positions ``(B, L)``, all ``< length``."""
        factors = self.table(length, like)[positions]  # (B, L, 2, 2, hd/2)
        return factors[:, :, None, 0], factors[:, :, None, 1]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply RoPE to ``x`` ``(B, L, H, hd)`` with factors ``(B, L, 1, 2, hd/2)``: ``x*C + swap_halves(x)*S``."""
    halves = x.unflatten(-1, (2, -1))  # (B, L, H, 2, hd/2)
    return torch.addcmul(halves * cos, halves.flip(-2), sin).flatten(-2)


def _fuse_legacy_weights(state_dict: dict[str, Tensor], prefix: str, parts: tuple[str, ...], fused: str) -> None:
    """Replace ``<prefix><part>.weight`` entries of an older checkpoint by their row-wise concatenation."""
    names = [f"{prefix}{part}.weight" for part in parts]
    if f"{prefix}{fused}.weight" not in state_dict and all(n in state_dict for n in names):
        state_dict[f"{prefix}{fused}.weight"] = torch.cat([state_dict.pop(n) for n in names], dim=0)


def _upgrade_hook(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: Any) -> None:
    """``load_state_dict`` pre-hook: convert an older checkpoint layout before the keys are matched."""
    module.upgrade_legacy_keys(state_dict, prefix)


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention with RoPE over ``F.scaled_dot_product_attention``.

    One ``qkv_proj`` computes queries, keys and values (rows ``[q; k; v]``).
    """

    def __init__(self, config: CausalTransformerConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        d = config.hidden_size
        self.qkv_proj = nn.Linear(d, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.dropout = config.dropout
        self.register_load_state_dict_pre_hook(_upgrade_hook)

    def upgrade_legacy_keys(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Fuse an older checkpoint's ``q_proj``/``k_proj``/``v_proj`` into ``qkv_proj`` (in place, idempotent)."""
        _fuse_legacy_weights(state_dict, prefix, ("q_proj", "k_proj", "v_proj"), "qkv_proj")

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor,
                past: tuple[Tensor, Tensor] | _Slot | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Attend from ``x`` (B, L, d) to the cached keys plus its own; ``mask`` is (B, 1, L, T_total).

        Args:
            x: Normalised inputs.
            rope: RoPE factors from :class:`RotaryEmbedding`.
            mask: Bool (True = may attend) or additive float mask.
            past: Earlier keys and values to concatenate with, or a slot of preallocated buffers to write into.

        Returns:
            The attention output ``(B, L, d)`` and the full keys and values (cache included).
        """
        b, n, _ = x.shape
        h, hk = self.num_heads, self.num_kv_heads
        qkv = fast_linear(self.qkv_proj, x).view(b, n, h + 2 * hk, self.head_dim)  # (B, L, H+2Hkv, hd)
        qk = _rotate(qkv[:, :, : h + hk], *rope)  # (B, L, H+Hkv, hd): queries and keys rotated together
        q, k = qk[:, :, :h].transpose(1, 2), qk[:, :, h:].transpose(1, 2)  # (B, H, L, hd), (B, Hkv, L, hd)
        v = qkv[:, :, h + hk:].transpose(1, 2)  # (B, Hkv, L, hd)
        if isinstance(past, _Slot):
            k, v = past.write(k, v)
        elif past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, enable_gqa=hk != h,
        )  # (B, H, L, hd)
        y = y.transpose(1, 2).reshape(b, n, h * self.head_dim)  # (B, L, H*hd)
        return fast_linear(self.o_proj, y), k, v


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with the gate and up projections in one matrix (rows ``[gate; up]``)."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(input_size, 2 * hidden_size, bias=False)
        self.down_proj = nn.Linear(hidden_size, output_size, bias=False)
        self.register_load_state_dict_pre_hook(_upgrade_hook)

    def upgrade_legacy_keys(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Fuse an older checkpoint's ``gate_proj``/``up_proj`` into ``gate_up_proj`` (in place, idempotent)."""
        _fuse_legacy_weights(state_dict, prefix, ("gate_proj", "up_proj"), "gate_up_proj")

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gated MLP to the last dimension."""
        gate, up = fast_linear(self.gate_up_proj, x).chunk(2, dim=-1)
        return fast_linear(self.down_proj, F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``."""

    def __init__(self, config: CausalTransformerConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.attn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.mlp = SwiGLU(d, config.intermediate_size, d)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _drop(self, x: Tensor) -> Tensor:
        # Dropout is the identity outside training or at p = 0; skipping the call saves per-step overhead.
        return self.resid_dropout(x) if self.training and self.resid_dropout.p > 0 else x

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor,
                past: tuple[Tensor, Tensor] | _Slot | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Return the block output ``(B, L, d)`` and this layer's full keys and values."""
        a, k, v = self.attn(self.attn_norm(x), rope, mask, past)
        h = x + self._drop(a)
        return h + self._drop(self.mlp(self.mlp_norm(h))), k, v


def _check_inputs(x: Tensor, attention_mask: Tensor | None, d: int) -> Tensor:
    """Validate ``x`` (B, L, d) and return the mask as bool ``(B, L)`` (all ones when None)."""
    if x.dim() != 3 or x.shape[-1] != d:
        raise ValueError(f"CausalTransformer: expected states of shape (B, L, {d}), got {tuple(x.shape)}")
    if attention_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if attention_mask.shape != x.shape[:2]:
        raise ValueError(f"CausalTransformer: attention_mask shape {tuple(attention_mask.shape)} does not match "
                         f"states {tuple(x.shape[:2])}")
    return attention_mask.to(device=x.device, dtype=torch.bool)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool "may attend" mask as the additive mask SDPA would build from it, once for all layers."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _causal(mask: Tensor) -> Tensor:
    """Causal and key-padding mask among ``L`` new positions ``(B, L, L)``; a padded query sees itself only."""
    n = mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    # A padded query sees itself only, so no softmax row is empty whatever the SDPA backend does with fully
    # masked rows (some kernels return NaN); its output is zeroed by the caller.
    return (causal & mask[:, None, :]) | eye


class CausalTransformer(nn.Module):
    """A stack of causal pre-norm blocks with a final RMSNorm, mapping ``(B, L, d)`` to ``(B, L, d)``.

    Args:
        config: Sizes and options.
    """

    def __init__(self, config: CausalTransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)

    def _run(self, x: Tensor, positions: Tensor, length: int, mask: Tensor,
             past: list[tuple[Tensor, Tensor]] | list[_Slot] | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        rope = self.rotary(positions, length, x)
        mask = _additive(mask, x.dtype) if len(self.layers) > 1 else mask
        keys, values = [], []
        use_ckpt = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            layer_past = None if past is None else past[i]
            if use_ckpt:
                x, k, v = checkpoint(layer, x, rope, mask, layer_past, use_reentrant=False)
            else:
                x, k, v = layer(x, rope, mask, layer_past)
            keys.append(k)
            values.append(v)
        return self.norm(x), keys, values

    def _store(self, like: Tensor, capacity: int) -> _KVStore:
        c = self.config
        return _KVStore.empty(like, c.num_layers, c.num_kv_heads, c.head_dim, capacity)

    def prefill(self, x: Tensor, attention_mask: Tensor | None = None,
                max_length: int | None = None) -> tuple[Tensor, KVCache]:
        """Run the full (causal) forward pass and keep every layer's keys and values for decoding.

        Args:
            x: Input states, shape ``(B, L, d)``; any padding pattern (left padding for prompts).
            attention_mask: 1 for real tokens, 0 for padding, shape ``(B, L)``. None: no padding.
            max_length: Under ``torch.no_grad()``, preallocate cache room for this many positions in all (prompt
                included), so that decoding up to it never copies the cache. Ignored with gradients enabled.

        Returns:
            Outputs ``(B, L, d)`` (zero at padded positions) and the cache to continue from.
        """
        mask = _check_inputs(x, attention_mask, self.config.hidden_size)
        n = x.shape[1]
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
        allowed = _causal(mask)[:, None]  # (B, 1, L, L)
        store = None
        if max_length is not None and not torch.is_grad_enabled():
            store = self._store(x, max(max_length, n))
            store.mask[:, :n] = mask
            store.filled = n
        y, keys, values = self._run(x, positions, n, allowed, None if store is None else store.slots(0))
        y = y * mask[..., None].to(y.dtype)
        cache = KVCache(keys=keys, values=values, attention_mask=mask if store is None else store.mask[:, :n],
                        next_position=mask.long().sum(dim=1), store=store)
        return y, cache

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Causal forward pass.

        Args:
            x: Input states, shape ``(B, L, d)``.
            attention_mask: 1 for real tokens, 0 for padding, shape ``(B, L)``. None: no padding.

        Returns:
            Outputs of shape ``(B, L, d)``; output ``t`` depends on inputs ``<= t`` only; zero at padded positions.
        """
        return self.prefill(x, attention_mask)[0]

    def _writable_store(self, cache: KVCache, n: int) -> _KVStore:
        """The store ``cache`` can append ``n`` positions to in place (copying or growing it when needed)."""
        t, store = cache.length, cache.store
        if store is None or store.filled != t:  # no buffers yet, or another continuation already wrote there
            return _KVStore.copy_of(cache, max(2 * t, t + n))
        if store.capacity < t + n:
            return _KVStore.copy_of(cache, max(2 * store.capacity, t + n))
        return store

    def extend(self, x: Tensor, cache: KVCache, attention_mask: Tensor | None = None) -> tuple[Tensor, KVCache]:
        """Append ``L`` positions per row after the cached ones and return their outputs (differentiable).

        The same outputs as running :meth:`forward` over the cached inputs followed by ``x``, without
        recomputing the cached part. With gradients enabled the cache's keys and values stay in the autograd
        graph, so a prompt encoded once (``prefill``), expanded per sample (``repeat_interleave``) and
        extended by each sample's continuation backpropagates into the shared prompt exactly as if each
        sample had been encoded whole.

        Args:
            x: New input states ``(B, L, d)``.
            cache: The cache to continue from.
            attention_mask: 1 for real new positions, ``(B, L)``; padding goes after the real ones (right
                padding). None: all real.

        Returns:
            Outputs ``(B, L, d)`` (zero at padded positions) and the cache ``L`` positions longer.
        """
        if x.dim() != 3 or x.shape[0] != cache.batch_size:
            raise ValueError(f"CausalTransformer.extend: expected x of shape ({cache.batch_size}, L, "
                             f"{self.config.hidden_size}), got {tuple(x.shape)}")
        new_mask = _check_inputs(x, attention_mask, self.config.hidden_size)
        return self._append(x, new_mask, cache, in_place=not torch.is_grad_enabled() and cache.store is not None)

    def step(self, x_t: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
        """Append one (real) position per row and return its output.

        Under ``torch.no_grad()`` the new keys and values are written in place into preallocated buffers (see
        :class:`KVCache`); with gradients enabled the cache is concatenated as in :meth:`extend`.

        Args:
            x_t: The new input state per row, shape ``(B, 1, d)``.
            cache: The cache from :meth:`prefill` or a previous :meth:`step`.

        Returns:
            The output for the new position ``(B, 1, d)`` and a new cache one position longer.
        """
        if x_t.dim() != 3 or x_t.shape[1] != 1 or x_t.shape[0] != cache.batch_size:
            raise ValueError(f"CausalTransformer.step: expected x_t of shape ({cache.batch_size}, 1, "
                             f"{self.config.hidden_size}), got {tuple(x_t.shape)}")
        return self._append(x_t, None, cache, in_place=not torch.is_grad_enabled())

    def _append(self, x: Tensor, new_mask: Tensor | None, cache: KVCache,
                in_place: bool) -> tuple[Tensor, KVCache]:
        """Run ``x`` after ``cache``; ``new_mask`` None means one real position per row (a decoding step)."""
        b, n, t = x.shape[0], x.shape[1], cache.length
        store = self._writable_store(cache, n) if in_place else None
        ones = new_mask is None
        if ones:
            new_mask = torch.ones(b, 1, dtype=torch.bool, device=x.device)
        if store is not None:
            store.mask[:, t:t + n] = new_mask
            mask = store.mask[:, :t + n]
            past = store.slots(t)
        else:
            mask = torch.cat([cache.attention_mask, new_mask], dim=1)
            past = list(zip(cache.keys, cache.values))
        if ones:  # a single real query: it may see every real key, itself included, nothing to zero
            positions, added = cache.next_position[:, None], 1
            allowed = mask[:, None, None, :]  # (B, 1, 1, T+1)
        else:
            added = new_mask.long().sum(dim=1)
            positions = cache.next_position[:, None] + (new_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
            old = cache.attention_mask[:, None, :].expand(b, n, t)
            allowed = torch.cat([old, _causal(new_mask)], dim=2)[:, None]  # (B, 1, L, T+L)
        y, keys, values = self._run(x, positions, t + n, allowed, past)
        if not ones:
            y = y * new_mask[..., None].to(y.dtype)
        if store is not None:
            store.filled = t + n
        return y, KVCache(keys=keys, values=values, attention_mask=mask, next_position=cache.next_position + added,
                          store=store)


def build_causal_transformer(config: CausalTransformerConfig) -> CausalTransformer:
    """Build a :class:`CausalTransformer` from its config."""
    return CausalTransformer(config)
