"""Decoding-time storage: the transformer KV cache, and a faster linear layer for few-row decoding steps.

:class:`KVCache` serves :class:`~latent_mca.models.transformer.CausalTransformer`; :func:`fast_linear` speeds up
the few-row matrix products of a decoding step.

Under ``torch.no_grad()`` keys and values are written in place into buffers preallocated to a capacity (grown by
doubling) instead of concatenating the whole cache every step; with gradients enabled the cache is concatenated
(autograd needs the old tensors). See :class:`KVCache` for when in-place writing happens and why it is safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["KVCache", "fast_linear"]

#: Rows up to which :func:`fast_linear` multiplies by a row-major copy of the weight (decoding steps).
FAST_LINEAR_MAX_ROWS = 64
#: Largest weight (elements) :func:`fast_linear` keeps a copy of: the copy doubles that weight's memory.
FAST_LINEAR_MAX_WEIGHT = 1 << 24


def fast_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)``, through a cached row-major ``(in, out)`` copy of the weight for a few rows on CPU without autograd.

    For a skinny input (a decoding step's ``B`` rows) MKL's GEMM against the transposed view that
    ``nn.Linear`` multiplies by runs about half as fast as against a contiguous ``(in, out)`` matrix
    (measured for ``B = 8`` and widths 128-1536; the same speed from ``B`` ~ 64 on). The copy is made once
    and reused until the weight changes (its version counter moves on every in-place update, e.g. an
    optimiser step or ``load_state_dict``); it doubles the layer's weight memory, so weights over
    :data:`FAST_LINEAR_MAX_WEIGHT` elements (e.g. a 152K-token ``lm_head``) are not copied. Everywhere else
    (gradients enabled, many rows, GPU, a layer with hooks such as ZeRO-3 parameter gathering or adapters) this
    is exactly ``layer(x)``.

    Args:
        layer: A linear layer.
        x: Inputs ``(..., in)``.

    Returns:
        ``(..., out)``.
    """
    w = layer.weight
    if (torch.is_grad_enabled() or type(layer) is not nn.Linear or w.device.type != "cpu"
            or layer._forward_hooks or layer._forward_pre_hooks
            or x.numel() > FAST_LINEAR_MAX_ROWS * x.shape[-1] or w.numel() > FAST_LINEAR_MAX_WEIGHT):
        return layer(x)
    key = (w.data_ptr(), w._version, w.dtype)
    cached = layer.__dict__.get("_fast_weight")
    if cached is None or cached[0] != key:
        cached = (key, w.t().contiguous())  # (in, out)
        layer.__dict__["_fast_weight"] = cached
    y = x @ cached[1]
    return y if layer.bias is None else y + layer.bias


class _KVStore:
    """Key/value buffers with room for ``capacity`` positions, shared by the successive caches of one decode.

    ``filled`` is how many positions hold data. Only a cache whose length equals ``filled`` may append in
    place; any other cache over the same store (an earlier one, stepped a second time) copies first.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], mask: Tensor, filled: int) -> None:
        self.keys, self.values, self.mask, self.filled = keys, values, mask, filled  # (B, Hkv, C, hd) / (B, C)

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @classmethod
    def empty(cls, like: Tensor, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int) -> _KVStore:
        """Uninitialised buffers for ``like.shape[0]`` rows (dtype and device of ``like``)."""
        b = like.shape[0]
        keys = [like.new_empty(b, num_kv_heads, capacity, head_dim) for _ in range(num_layers)]
        values = [like.new_empty(b, num_kv_heads, capacity, head_dim) for _ in range(num_layers)]
        return cls(keys, values, torch.zeros(b, capacity, dtype=torch.bool, device=like.device), 0)

    @classmethod
    def copy_of(cls, cache: KVCache, capacity: int) -> _KVStore:
        """A store holding a copy of ``cache`` with room for ``capacity`` positions."""
        t = cache.length
        mask = cache.attention_mask.new_zeros(cache.batch_size, capacity)
        mask[:, :t] = cache.attention_mask
        buffers = []
        for tensors in (cache.keys, cache.values):
            out = []
            for x in tensors:
                buf = x.new_empty(x.shape[0], x.shape[1], capacity, x.shape[3])
                buf[:, :, :t] = x
                out.append(buf)
            buffers.append(out)
        return cls(buffers[0], buffers[1], mask, t)

    def slots(self, start: int) -> list[_Slot]:
        """Per-layer write positions for the next positions after ``start``."""
        return [_Slot(k, v, start) for k, v in zip(self.keys, self.values)]


class _Slot:
    """Where one layer writes new keys/values in place; returns views of everything written so far."""

    def __init__(self, keys: Tensor, values: Tensor, start: int) -> None:
        self.keys, self.values, self.start = keys, values, start

    def write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.start + k.shape[2]
        self.keys[:, :, self.start:end] = k
        self.values[:, :, self.start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]  # (B, Hkv, T, hd) views


@dataclass
class KVCache:
    """Keys and values of every cached position, for all layers, plus what the next step needs.

    Two storage modes, the same to a reader:

    * plain tensors (``prefill`` or ``extend`` with gradients enabled, :meth:`select`): never written in
      place; extending concatenates into new tensors, so an older cache stays valid and autograd is safe;
    * a preallocated store (``step`` under ``torch.no_grad()``, or ``prefill(..., max_length=...)`` under
      ``no_grad``): ``keys``/``values``/``attention_mask`` are views of buffers with room for more positions,
      and a step writes the new position in place (no copy of the cache). Positions a cache covers are never
      overwritten: stepping an older cache a second time (a branch) copies it to a new store first, so every
      cache returned stays valid. The buffers double when full.

    Attributes:
        keys: Per layer, rotated keys of shape ``(B, H_kv, T, head_dim)``.
        values: Per layer, values of shape ``(B, H_kv, T, head_dim)``.
        attention_mask: Which cached positions are real tokens, shape ``(B, T)``, bool.
        next_position: RoPE position of the next token per row, shape ``(B,)``.
        store: The preallocated buffers behind the views (None in plain mode).
    """

    keys: list[Tensor]
    values: list[Tensor]
    attention_mask: Tensor  # (B, T)
    next_position: Tensor  # (B,)
    store: _KVStore | None = field(default=None, repr=False, compare=False)

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

        Used to draw several samples per prompt from one prefill. Differentiable in plain mode (the gradient
        of the repeated rows is summed into the original); a preallocated store is repeated with its free room.
        """
        if repeats < 1:
            raise ValueError(f"KVCache.repeat_interleave: repeats must be >= 1, got {repeats}")
        if repeats == 1:
            return self  # caches are never modified where they hold data, so sharing is safe
        next_position = self.next_position.repeat_interleave(repeats, dim=0)
        if self.store is not None:
            t, s = self.length, self.store
            store = _KVStore([k.repeat_interleave(repeats, dim=0) for k in s.keys],
                             [v.repeat_interleave(repeats, dim=0) for v in s.values],
                             s.mask.repeat_interleave(repeats, dim=0), t)
            return KVCache([k[:, :, :t] for k in store.keys], [v[:, :, :t] for v in store.values],
                           store.mask[:, :t], next_position, store)
        return KVCache(
            keys=[k.repeat_interleave(repeats, dim=0) for k in self.keys],
            values=[v.repeat_interleave(repeats, dim=0) for v in self.values],
            attention_mask=self.attention_mask.repeat_interleave(repeats, dim=0),
            next_position=next_position,
        )

    def select(self, rows: Tensor) -> KVCache:
        """Keep only the given rows (an index or bool tensor over the batch), e.g. to drop finished samples."""
        return KVCache(
            keys=[k[rows] for k in self.keys],
            values=[v[rows] for v in self.values],
            attention_mask=self.attention_mask[rows],
            next_position=self.next_position[rows],
        )
