"""The language world model f_world: the state moved by a latent action, read out by the frozen ``lm_head``.

One formula in every stage (the authors' code uses two, see bug B1 in the notes):

    out_t = e_t + Delta(e_t, c_{a_t}),    logits_t = lm_head(out_t),

where ``Delta`` is a stack of residual gated merge blocks on ``[state; code]``. The last projection of every block
starts at zero, so before training ``out == e`` exactly and the world model reproduces the base model's
next-token distribution. The world model does not own ``lm_head``: the caller applies the backbone's frozen head,
and this module's ``state_dict`` holds the merge blocks only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latent_mca.models.transformer import swiglu_hidden_size

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


class MergeBlock(nn.Module):
    """``x + proj(silu(fc1([n(x); c])) * fc2([n(x); c]))`` with ``n`` an optional RMSNorm and ``proj`` zero-initialised.

    Args:
        config: Sizes.
    """

    def __init__(self, config: WorldModelConfig) -> None:
        super().__init__()
        d, width = config.hidden_size, config.intermediate_size
        self.norm = nn.RMSNorm(d, eps=config.norm_eps) if config.pre_norm else nn.Identity()
        self.fc1 = nn.Linear(2 * d, width, bias=False)
        self.fc2 = nn.Linear(2 * d, width, bias=False)
        self.proj = nn.Linear(width, d, bias=False)
        nn.init.zeros_(self.proj.weight)  # the block starts as the identity

    def forward(self, x: Tensor, code: Tensor) -> Tensor:
        """Update states ``x`` ``(..., d)`` with code vectors ``code`` ``(..., d)``."""
        z = torch.cat([self.norm(x), code.to(x.dtype)], dim=-1)  # (..., 2d)
        return x + self.proj(F.silu(self.fc1(z)) * self.fc2(z))


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


def build_world_model(config: WorldModelConfig) -> WorldModel:
    """Build a :class:`WorldModel` from its config."""
    return WorldModel(config)
