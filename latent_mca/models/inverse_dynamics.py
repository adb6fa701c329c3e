"""The inverse dynamics model f_inverse: which latent action explains the next token.

A causal transformer reads the backbone states ``e_{1:L}``. The action for step ``t`` (the code that, with
``e_t``, must let the world model predict ``x_{t+1}``) is read at position ``t+1``, the first position where
``x_{t+1}`` is visible; the model therefore sees one token of the future and nothing beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latent_mca.models.transformer import CausalTransformer, CausalTransformerConfig

__all__ = [
    "InverseDynamics",
    "InverseDynamicsConfig",
    "InverseDynamicsOutput",
    "build_inverse_dynamics",
    "inverse_entropy_terms",
]


@dataclass
class InverseDynamicsConfig:
    """Sizes of :class:`InverseDynamics` (transformer fields as in :class:`CausalTransformerConfig`).

    Attributes:
        hidden_size: Backbone hidden size ``d``.
        num_layers: Transformer blocks (paper: 4).
        num_heads: Attention heads (None: head width 64, see :class:`CausalTransformerConfig`).
        num_kv_heads: Key/value heads (None: ``num_heads``).
        num_codes: Number of latent actions ``K`` (paper: 128).
        intermediate_size: SwiGLU width (None: ~8/3 d).
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        dropout: Transformer dropout.
        gradient_checkpointing: Recompute activations in the backward pass.
    """

    hidden_size: int
    num_layers: int = 4
    num_heads: int | None = None
    num_kv_heads: int | None = None
    num_codes: int = 128
    intermediate_size: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.num_codes < 2:
            raise ValueError(f"InverseDynamicsConfig: num_codes must be >= 2, got {self.num_codes}")
        resolved = self.transformer_config()
        self.num_heads, self.num_kv_heads = resolved.num_heads, resolved.num_kv_heads
        self.intermediate_size = resolved.intermediate_size

    def transformer_config(self) -> CausalTransformerConfig:
        """The config of the underlying transformer."""
        return CausalTransformerConfig(
            hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, intermediate_size=self.intermediate_size, rope_theta=self.rope_theta,
            norm_eps=self.norm_eps, dropout=self.dropout, gradient_checkpointing=self.gradient_checkpointing,
        )


class InverseDynamicsOutput(NamedTuple):
    """Action logits per step and where they are defined.

    Attributes:
        logits: ``logits[:, t]`` scores the action for step ``t`` (state ``e_t`` -> token ``x_{t+1}``),
            shape ``(B, L, K)``; zero where ``valid`` is False.
        valid: True where both ``x_t`` and ``x_{t+1}`` are real tokens, shape ``(B, L)``; always False at the last
            position, which has no next token. Callers must mask losses and samples with it.
    """

    logits: Tensor
    valid: Tensor


class InverseDynamics(nn.Module):
    """f_inverse: causal transformer + final norm + linear head to ``K`` code logits, shifted one step left.

    Args:
        config: Sizes.
    """

    def __init__(self, config: InverseDynamicsConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = CausalTransformer(config.transformer_config())
        self.head = nn.Linear(config.hidden_size, config.num_codes, bias=False)

    def forward(self, states: Tensor, attention_mask: Tensor | None = None) -> InverseDynamicsOutput:
        """Infer the action of every step from the states up to the step's next token.

        Args:
            states: Backbone states ``e``, shape ``(B, L, d)``.
            attention_mask: 1 for real tokens, shape ``(B, L)``. None: no padding.

        Returns:
            Logits ``(B, L, K)`` for steps ``0 .. L-1`` and their validity mask ``(B, L)``.
        """
        if attention_mask is None:
            attention_mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        mask = attention_mask.to(device=states.device, dtype=torch.bool)
        raw = self.head(self.transformer(states, mask))  # (B, L, K); position j has seen x_{<=j}
        # Step t's action is read where x_{t+1} is visible: shift left by one, nothing to read for the last step.
        valid = torch.zeros_like(mask)
        valid[:, :-1] = mask[:, :-1] & mask[:, 1:]  # (B, L)
        logits = F.pad(raw[:, 1:], (0, 0, 0, 1)).masked_fill(~valid[..., None], 0.0)  # (B, L, K)
        return InverseDynamicsOutput(logits=logits, valid=valid)


def inverse_entropy_terms(logits: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
    """Entropy regularisers on the inverse model's code distribution (computed in float32).

    Args:
        logits: Code logits ``(..., K)``.
        mask: Which positions count, shape ``(...)`` (e.g. :attr:`InverseDynamicsOutput.valid`). None: all.

    Returns:
        ``token_neg_entropy``: ``mean_t sum_k p log p`` (= minus the mean per-token entropy); the authors add
        ``1e-3`` times it to the loss, which *maximises* per-token entropy.
        ``batch_usage_entropy``: entropy of the batch-marginal distribution ``mean_t p_t``; subtract a multiple of
        it from the loss to spread code usage across the batch (computed on the local batch only).
        Both are 0 when the mask selects nothing.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)  # (..., K)
    flat_log_p = log_p.reshape(-1, log_p.shape[-1])  # (N, K)
    if mask is not None:
        if mask.shape != logits.shape[:-1]:
            raise ValueError(f"inverse_entropy_terms: mask shape {tuple(mask.shape)} does not match logits "
                             f"{tuple(logits.shape[:-1])}")
        flat_log_p = flat_log_p[mask.reshape(-1).to(torch.bool)]
    if flat_log_p.shape[0] == 0:
        zero = logits.new_zeros((), dtype=torch.float32)
        return {"token_neg_entropy": zero, "batch_usage_entropy": zero.clone()}
    p = flat_log_p.exp()
    token_neg_entropy = (p * flat_log_p).sum(dim=-1).mean()
    marginal = p.mean(dim=0)  # (K,)
    batch_usage_entropy = -(marginal * marginal.clamp(min=1e-30).log()).sum()
    return {"token_neg_entropy": token_neg_entropy, "batch_usage_entropy": batch_usage_entropy}


def build_inverse_dynamics(config: InverseDynamicsConfig) -> InverseDynamics:
    """Build an :class:`InverseDynamics` from its config."""
    return InverseDynamics(config)
