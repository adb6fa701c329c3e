"""The language world model f_world: the state moved by a latent action, read out by the frozen ``lm_head``.

One formula in every stage (the authors' code uses two, see bug B1 in the notes):

    out_t = e_t + Delta(e_t, c_{a_t}),    logits_t = lm_head(out_t),

where ``Delta`` is a stack of residual gated merge blocks on ``[state; code]``. The last projection of every block
starts at zero, so before training ``out == e`` exactly and the world model reproduces the base model's
next-token distribution. The world model does not own ``lm_head``: the caller applies the backbone's frozen head,
and this module's ``state_dict`` holds the merge blocks only.

A merge block's input layers act on the concatenation ``[n(x); c]``; they are stored as their two halves,
``W [n(x); c] = W_x n(x) + W_c c`` (``state_proj`` and ``code_proj``, each holding the gate and up rows), which
is the same function. The code half depends on the action alone, so a decoder computes it once for all ``K``
codes (:meth:`WorldModel.code_features`) and looks it up per step (:meth:`WorldModel.merge`) instead of
multiplying ``[state; code]`` every step. Checkpoints with the former ``fc1``/``fc2`` layout load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latent_mca.models.transformer import _upgrade_hook, fast_linear, swiglu_hidden_size

__all__ = ["MergeBlock", "WorldModel", "WorldModelConfig", "build_world_model"]


@dataclass
class WorldModelConfig:
    """Sizes of a :class:`WorldModel`.

    Attributes:
        hidden_size: Backbone hidden size ``d``.
        num_blocks: Merge blocks (paper: 2).
        intermediate_size: Hidden width of each block's gated MLP. None: ~8/3 of its ``2d`` input
            (for d = 2048 this is 10944, close to the authors' 11008).
        pre_norm: RMS-normalise the state stream before each block. The first block's input is already the
            backbone's normalised output, but later blocks see ``e + Delta``, whose scale drifts in training;
            normalising keeps state and code on one scale. The code vector enters unnormalised (its scale is
            learned by the codebook).
        norm_eps: RMSNorm epsilon.
    """

    hidden_size: int
    num_blocks: int = 2
    intermediate_size: int | None = None
    pre_norm: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = swiglu_hidden_size(2 * self.hidden_size)
        if self.hidden_size <= 0 or self.num_blocks < 1 or self.intermediate_size <= 0:
            raise ValueError(f"WorldModelConfig: need hidden_size > 0, num_blocks >= 1, intermediate_size > 0; got "
                             f"{self.hidden_size}, {self.num_blocks}, {self.intermediate_size}")


def _split_legacy_weights(state_dict: dict[str, Tensor], prefix: str) -> None:
    """Turn an older checkpoint's ``fc1``/``fc2`` over ``[state; code]`` into ``state_proj``/``code_proj``."""
    fc1, fc2 = f"{prefix}fc1.weight", f"{prefix}fc2.weight"
    if fc1 in state_dict and fc2 in state_dict and f"{prefix}state_proj.weight" not in state_dict:
        w1, w2 = state_dict.pop(fc1), state_dict.pop(fc2)  # (width, 2d) each
        d = w1.shape[1] // 2
        state_dict[f"{prefix}state_proj.weight"] = torch.cat([w1[:, :d], w2[:, :d]], dim=0)  # (2 width, d)
        state_dict[f"{prefix}code_proj.weight"] = torch.cat([w1[:, d:], w2[:, d:]], dim=0)


class MergeBlock(nn.Module):
    """``x + proj(silu(g) * u)`` with ``[g; u] = W_x n(x) + W_c c``, ``n`` an optional RMSNorm, ``proj`` zero at init.

    ``[W_x W_c]`` is the gated MLP's input layer over ``[n(x); c]`` (gate rows first, then up rows).

    Args:
        config: Sizes.
    """

    def __init__(self, config: WorldModelConfig) -> None:
        super().__init__()
        d, width = config.hidden_size, config.intermediate_size
        self.norm = nn.RMSNorm(d, eps=config.norm_eps) if config.pre_norm else nn.Identity()
        self.state_proj = nn.Linear(d, 2 * width, bias=False)
        self.code_proj = nn.Linear(d, 2 * width, bias=False)
        self.proj = nn.Linear(width, d, bias=False)
        bound = 1.0 / (2 * d) ** 0.5  # nn.Linear's default init for the 2d-wide concatenated input
        nn.init.uniform_(self.state_proj.weight, -bound, bound)
        nn.init.uniform_(self.code_proj.weight, -bound, bound)
        nn.init.zeros_(self.proj.weight)  # the block starts as the identity
        self.register_load_state_dict_pre_hook(_upgrade_hook)

    def upgrade_legacy_keys(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Split an older checkpoint's ``fc1``/``fc2`` into ``state_proj``/``code_proj`` (in place, idempotent)."""
        _split_legacy_weights(state_dict, prefix)

    def code_features(self, code: Tensor) -> Tensor:
        """The code half ``W_c c`` for code vectors ``(..., d)``: ``(..., 2 * width)``."""
        return self.code_proj(code)

    def merge(self, x: Tensor, code_features: Tensor) -> Tensor:
        """Update states ``x`` ``(..., d)`` given the code half :meth:`code_features` ``(..., 2 * width)``."""
        hidden = fast_linear(self.state_proj, self.norm(x)) + code_features
        gate, up = hidden.chunk(2, dim=-1)
        return x + fast_linear(self.proj, F.silu(gate) * up)

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        """Update states ``x`` ``(..., d)`` with code vectors ``code`` ``(..., d)``."""
        return self.merge(x, self.code_features(code.to(x.dtype)))


class WorldModel(nn.Module):
    """Residual merge blocks: ``out = e + Delta(e, c)``; apply the backbone's ``lm_head`` to ``out``.

    Args:
        config: Sizes.
    """

    def __init__(self, config: WorldModelConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(MergeBlock(config) for _ in range(config.num_blocks))

    def forward(self, states: Tensor, code_emb: Tensor) -> Tensor:
        """Move every state by its action.

        Args:
            states: Backbone states ``e_t``, shape ``(B, L, d)`` (any ``(..., d)``; ``(B, 1, d)`` when decoding).
            code_emb: Code vectors ``c_{a_t}`` of the same shape.

        Returns:
            ``out_t`` of the same shape; ``lm_head(out_t)`` are the next-token logits.
        """
        if states.shape != code_emb.shape or states.shape[-1] != self.config.hidden_size:
            raise ValueError(f"WorldModel: states {tuple(states.shape)} and code_emb {tuple(code_emb.shape)} must "
                             f"have the same shape (..., {self.config.hidden_size})")
        x = states
        for block in self.blocks:
            x = block(x, code_emb)
        return x

    def code_features(self, code_emb: Tensor) -> Tensor:
        """Every block's code half for code vectors ``(..., d)``: ``(..., num_blocks, 2 * width)``.

        Applied to the whole codebook ``(K, d)`` it gives a table to index with the chosen codes each step.
        """
        return torch.stack([block.code_features(code_emb) for block in self.blocks], dim=-2)

    def merge(self, states: Tensor, features: Tensor) -> Tensor:
        """:meth:`forward` from precomputed :meth:`code_features` ``(..., num_blocks, 2 * width)`` of the codes.

        Args:
            states: ``(..., d)``.
            features: The code halves of each state's code, e.g. ``table[codes]``.

        Returns:
            ``out`` ``(..., d)``, equal to ``forward(states, code_emb)`` up to float rounding.
        """
        x = states
        for i, block in enumerate(self.blocks):
            x = block.merge(x, features[..., i, :])
        return x


def build_world_model(config: WorldModelConfig) -> WorldModel:
    """Build a :class:`WorldModel` from its config."""
    return WorldModel(config)
