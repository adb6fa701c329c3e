"""The latent action codebook C, straight-through Gumbel sampling of codes, and code-usage statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Codebook", "CodebookConfig", "build_codebook", "code_usage_stats", "straight_through_sample"]


@dataclass
class CodebookConfig:
    """Size of a :class:`Codebook`.

    Attributes:
        hidden_size: Code embedding width ``d`` (the backbone's hidden size).
        num_codes: Number of latent actions ``K`` (the paper's |C| = 128).
        init_std: Standard deviation of the initial code vectors. 1.0 puts codes on the scale of RMS-normalised
            states, which they are concatenated with in the world model.
    """

    hidden_size: int
    num_codes: int = 128
    init_std: float = 1.0

    def __post_init__(self) -> None:
        if self.hidden_size <= 0 or self.num_codes < 2:
            raise ValueError(f"CodebookConfig: need hidden_size > 0 and num_codes >= 2, got "
                             f"hidden_size={self.hidden_size}, num_codes={self.num_codes}")


class Codebook(nn.Module):
    """A table of ``K`` code vectors ``c_a`` in ``R^d``.

    Args:
        config: Sizes.
    """

    def __init__(self, config: CodebookConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.randn(config.num_codes, config.hidden_size) * config.init_std)  # (K, d)

    @property
    def num_codes(self) -> int:
        """``K``."""
        return self.weight.shape[0]

    def embed(self, indices: Tensor) -> Tensor:
        """Look up codes: indices ``(...)`` (int) to vectors ``(..., d)``."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise IndexError(f"Codebook.embed: code indices must lie in [0, {self.num_codes}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return F.embedding(indices, self.weight)

    def embed_soft(self, weights: Tensor) -> Tensor:
        """Mix codes: weights ``(..., K)`` (e.g. straight-through one-hots) to ``weights @ table`` ``(..., d)``.

        With a straight-through one-hot the value equals :meth:`embed` of its index, and gradients reach both
        the table and the logits the one-hot was sampled from.
        """
        if weights.shape[-1] != self.num_codes:
            raise ValueError(f"Codebook.embed_soft: last dimension must be num_codes={self.num_codes}, got "
                             f"{tuple(weights.shape)}")
        return weights.to(self.weight.dtype) @ self.weight

    def forward(self, indices: Tensor) -> Tensor:
        """Same as :meth:`embed`."""
        return self.embed(indices)


def straight_through_sample(logits: Tensor, tau: float = 2.0, hard: bool = True) -> tuple[Tensor, Tensor]:
    """Sample codes with the Gumbel-softmax trick (``F.gumbel_softmax``).

    Args:
        logits: Unnormalised code scores, shape ``(..., K)``.
        tau: Gumbel-softmax temperature (the paper's code uses 2.0).
        hard: Return exact one-hots in the forward pass with the soft sample's gradient (straight-through).
            False: the relaxed sample itself.

    Returns:
        ``(one_hot, index)``: weights of shape ``(..., K)`` to feed :meth:`Codebook.embed_soft`, and the sampled
        code (the argmax of the weights) of shape ``(...)``.
    """
    if tau <= 0:
        raise ValueError(f"straight_through_sample: tau must be > 0, got {tau}")
    weights = F.gumbel_softmax(logits, tau=tau, hard=hard, dim=-1)
    return weights, weights.argmax(dim=-1)


def code_usage_stats(indices: Tensor, num_codes: int, mask: Tensor | None = None) -> dict[str, Tensor]:
    """How evenly a batch uses the codebook.

    Args:
        indices: Chosen codes, any shape, int.
        num_codes: ``K``.
        mask: Which entries count, same shape as ``indices``. None: all.

    Returns:
        ``perplexity``: ``exp`` of the entropy of the empirical code distribution (1 = one code, K = uniform);
        ``used``: the number of distinct codes. Both are float scalars (0 and 0 when nothing is selected).
    """
    flat = indices.reshape(-1) if mask is None else indices[mask.to(torch.bool)]
    counts = torch.bincount(flat.long(), minlength=num_codes).float()  # (K,)
    if counts.numel() != num_codes:
        raise ValueError(f"code_usage_stats: indices reach {counts.numel() - 1}, beyond num_codes={num_codes}")
    total = counts.sum()
    if total == 0:
        zero = counts.new_zeros(())
        return {"perplexity": zero, "used": zero.clone()}
    probs = counts / total
    entropy = -(probs * probs.clamp(min=1e-30).log()).sum()
    return {"perplexity": entropy.exp(), "used": (counts > 0).sum().float()}


def build_codebook(config: CodebookConfig) -> Codebook:
    """Build a :class:`Codebook` from its config."""
    return Codebook(config)
