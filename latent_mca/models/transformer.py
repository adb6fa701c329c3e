"""A small pre-norm causal transformer over backbone states, with RoPE and an incremental-decoding KV cache.

The inverse dynamics model and the latent policy are both stacks of these blocks on top of the frozen
backbone's final hidden states ``e`` (shape ``(B, L, d)``). Blocks follow the Llama/Qwen recipe (RMSNorm
pre-norm, rotary multi-head attention with optional grouped KV heads, SwiGLU MLP) but are written here, so the
modules do not depend on a transformers modeling file.

Positions come from the attention mask (``cumsum(mask) - 1``), so left-padded and unpadded batches give the
same outputs on their real tokens. Attention is causal plus key padding; a padded query row is allowed to
attend to itself so that no softmax row is empty (an all-masked row would give NaN), and outputs at padded
positions are set to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["CausalTransformer", "CausalTransformerConfig", "KVCache", "build_causal_transformer", "swiglu_hidden_size"]


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


@dataclass
class KVCache:
    """Keys and values of every cached position, for all layers, plus what the next step needs.

    Tensors are never written in place: :meth:`CausalTransformer.step` returns a new cache (``torch.cat``,
    like transformers' ``DynamicCache``), so an older cache stays valid and autograd is safe.

    Attributes:
        keys: Per layer, rotated keys of shape ``(B, H_kv, T, head_dim)``.
        values: Per layer, values of shape ``(B, H_kv, T, head_dim)``.
        attention_mask: Which cached positions are real tokens, shape ``(B, T)``, bool.
        next_position: RoPE position of the next token per row, shape ``(B,)``.
    """

    keys: list[Tensor]
    values: list[Tensor]
    attention_mask: Tensor  # (B, T)
    next_position: Tensor  # (B,)

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        """Number of cached positions ``T`` (padding included)."""
        return self.attention_mask.shape[1]

    def repeat_interleave(self, repeats: int) -> KVCache:
        """Expand every row ``repeats`` times (row ``i`` becomes rows ``i*repeats ... i*repeats+repeats-1``).

        Used to draw several samples per prompt from one prefill.
        """
        if repeats < 1:
            raise ValueError(f"KVCache.repeat_interleave: repeats must be >= 1, got {repeats}")
        return KVCache(
            keys=[k.repeat_interleave(repeats, dim=0) for k in self.keys],
            values=[v.repeat_interleave(repeats, dim=0) for v in self.values],
            attention_mask=self.attention_mask.repeat_interleave(repeats, dim=0),
            next_position=self.next_position.repeat_interleave(repeats, dim=0),
        )

    def select(self, rows: Tensor) -> KVCache:
        """Keep only the given rows (an index or bool tensor over the batch), e.g. to drop finished samples."""
        return KVCache(
            keys=[k[rows] for k in self.keys],
            values=[v[rows] for v in self.values],
            attention_mask=self.attention_mask[rows],
            next_position=self.next_position[rows],
        )


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half convention) evaluated at arbitrary per-row positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``cos`` and ``sin`` of shape ``(B, 1, L, head_dim)`` for integer positions ``(B, L)``."""
        freqs = positions[..., None].float() * self.inv_freq  # (B, L, hd/2)
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, L, hd)
        return angles.cos(), angles.sin()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention with RoPE over ``F.scaled_dot_product_attention``."""

    def __init__(self, config: CausalTransformerConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.dropout = config.dropout

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Attend from ``x`` (B, L, d) to the cached keys plus its own; ``mask`` is (B, 1, L, T_total) bool.

        Returns:
            The attention output ``(B, L, d)`` and the full keys and values (cache included).
        """
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, L, hd)
        y = y.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)  # (B, L, H*hd)
        return self.o_proj(y), k, v


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(input_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(input_size, hidden_size, bias=False)
        self.down_proj = nn.Linear(hidden_size, output_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gated MLP to the last dimension."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Return the block output ``(B, L, d)`` and this layer's full keys and values."""
        a, k, v = self.attn(self.attn_norm(x), cos, sin, mask, past)
        h = x + self.resid_dropout(a)
        return h + self.resid_dropout(self.mlp(self.mlp_norm(h))), k, v


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

    def _run(self, x: Tensor, positions: Tensor, mask: Tensor,
             cache: KVCache | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        cos, sin = self.rotary(positions)
        keys, values = [], []
        use_ckpt = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            past = None if cache is None else (cache.keys[i], cache.values[i])
            if use_ckpt:
                x, k, v = checkpoint(layer, x, cos, sin, mask, past, use_reentrant=False)
            else:
                x, k, v = layer(x, cos, sin, mask, past)
            keys.append(k)
            values.append(v)
        return self.norm(x), keys, values

    def prefill(self, x: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, KVCache]:
        """Run the full (causal) forward pass and keep every layer's keys and values for decoding.

        Args:
            x: Input states, shape ``(B, L, d)``; any padding pattern (left padding for prompts).
            attention_mask: 1 for real tokens, 0 for padding, shape ``(B, L)``. None: no padding.

        Returns:
            Outputs ``(B, L, d)`` (zero at padded positions) and the cache to continue from.
        """
        mask = _check_inputs(x, attention_mask, self.config.hidden_size)
        n = x.shape[1]
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        # A padded query sees itself only, so no softmax row is empty whatever the SDPA backend does with
        # fully masked rows (some kernels return NaN); its output is zeroed below.
        allowed = ((causal & mask[:, None, :]) | eye)[:, None]  # (B, 1, L, L)
        y, keys, values = self._run(x, positions, allowed, None)
        y = y * mask[..., None].to(y.dtype)
        cache = KVCache(keys=keys, values=values, attention_mask=mask, next_position=mask.long().sum(dim=1))
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

    def step(self, x_t: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
        """Append one (real) position per row and return its output.

        Args:
            x_t: The new input state per row, shape ``(B, 1, d)``.
            cache: The cache from :meth:`prefill` or a previous :meth:`step`.

        Returns:
            The output for the new position ``(B, 1, d)`` and a new cache one position longer.
        """
        if x_t.dim() != 3 or x_t.shape[1] != 1 or x_t.shape[0] != cache.batch_size:
            raise ValueError(f"CausalTransformer.step: expected x_t of shape ({cache.batch_size}, 1, "
                             f"{self.config.hidden_size}), got {tuple(x_t.shape)}")
        mask = torch.cat([cache.attention_mask, cache.attention_mask.new_ones(cache.batch_size, 1)], dim=1)
        allowed = mask[:, None, None, :]  # (B, 1, 1, T+1); earlier positions only, so no causal part
        y, keys, values = self._run(x_t, cache.next_position[:, None], allowed, cache)
        new_cache = KVCache(keys=keys, values=values, attention_mask=mask, next_position=cache.next_position + 1)
        return y, new_cache


def build_causal_transformer(config: CausalTransformerConfig) -> CausalTransformer:
    """Build a :class:`CausalTransformer` from its config."""
    return CausalTransformer(config)
