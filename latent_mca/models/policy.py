"""The latent policy pi_theta over codes, and sampling with log-probabilities of the distribution actually used.

The policy reads the states ``e_{1:t}`` (no future token) and scores the ``K`` codes for step ``t``. Rollouts
decode it incrementally with a KV cache (:meth:`LatentPolicy.prefill` / :meth:`LatentPolicy.step`).

Sampling applies temperature, then top-k, then top-p (the order of transformers' ``generate``, using its logits
warpers). :func:`sample_codes` returns the log-probability of each code under that processed distribution and
:func:`code_logprobs` recomputes exactly the same quantity for the policy update, so the ratio and the KL use
the distribution the codes were drawn from (the authors' code samples from a top-32 distribution but scores the
full softmax, bug B9). If the kept set changes between rollout and update (the logits moved), a code outside the
new set gets ``-inf``; callers clipping ratios should keep the truncation off (``top_k=0, top_p=1``) for
off-policy reuse or handle that case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latent_mca.models.transformer import CausalTransformer, CausalTransformerConfig, KVCache, fast_linear

__all__ = ["LatentPolicy", "LatentPolicyConfig", "build_policy", "code_logprobs", "processed_logprobs",
           "sample_codes"]


@dataclass
class LatentPolicyConfig:
    """Sizes of a :class:`LatentPolicy` (transformer fields as in :class:`CausalTransformerConfig`).

    Attributes:
        hidden_size: Backbone hidden size ``d``.
        num_layers: Transformer blocks (paper: 8).
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
    num_layers: int = 8
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
            raise ValueError(f"LatentPolicyConfig: num_codes must be >= 2, got {self.num_codes}")
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


class LatentPolicy(nn.Module):
    """pi_theta: causal transformer + final norm + linear head to ``K`` code logits, one per position.

    ``logits[:, t]`` is the distribution of the action for step ``t`` given ``e_{1:t}``. Pass detached states
    when the backbone (and its final norm) must stay frozen.

    Args:
        config: Sizes.
    """

    def __init__(self, config: LatentPolicyConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = CausalTransformer(config.transformer_config())
        self.head = nn.Linear(config.hidden_size, config.num_codes, bias=False)

    def forward(self, states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Code logits for every position.

        Args:
            states: Backbone states ``(B, L, d)``.
            attention_mask: 1 for real tokens, ``(B, L)``. None: no padding.

        Returns:
            Logits ``(B, L, K)`` (zero at padded positions).
        """
        return self.head(self.transformer(states, attention_mask))

    def prefill(self, states: Tensor, attention_mask: Tensor | None = None,
                max_length: int | None = None) -> tuple[Tensor, KVCache]:
        """Score a (left-padded) prompt and open a cache: logits ``(B, L, K)`` and the cache.

        ``max_length`` (under ``torch.no_grad()``) preallocates the cache for that many positions, prompt
        included (see :meth:`CausalTransformer.prefill`).
        """
        hidden, cache = self.transformer.prefill(states, attention_mask, max_length=max_length)
        return self.head(hidden), cache

    def step(self, state_t: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
        """Score one new state per row ``(B, 1, d)``: logits ``(B, 1, K)`` and the extended cache."""
        hidden, cache = self.transformer.step(state_t, cache)
        return fast_linear(self.head, hidden), cache

    def extend(self, states: Tensor, cache: KVCache, attention_mask: Tensor | None = None) -> tuple[Tensor, KVCache]:
        """Score ``L`` new states per row after a cache (right-padded), differentiably: logits ``(B, L, K)``.

        See :meth:`CausalTransformer.extend`; used to score several continuations of one prefilled prompt.
        """
        hidden, cache = self.transformer.extend(states, cache, attention_mask)
        return self.head(hidden), cache


def processed_logprobs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Log-probabilities of the distribution codes are sampled from, in float32; excluded codes get ``-inf``.

    Args:
        logits: Code logits ``(..., K)``.
        temperature: Divides the logits first. ``<= 0`` means greedy: log-probability 0 for the argmax, ``-inf``
            elsewhere (no gradient flows then).
        top_k: Keep the ``top_k`` best codes (ties at the boundary are kept). 0: no limit.
        top_p: Keep the smallest set of best codes whose probability reaches ``top_p``. 1.0: no limit.

    Returns:
        Log-probabilities ``(..., K)``.
    """
    if not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"processed_logprobs: need 0 < top_p <= 1 and top_k >= 0, got top_p={top_p}, top_k={top_k}")
    k = logits.shape[-1]
    scores = logits.float().reshape(-1, k)  # (N, K)
    if temperature <= 0:
        greedy = F.one_hot(scores.argmax(dim=-1), k).bool()
        out = torch.full_like(scores, float("-inf")).masked_fill(greedy, 0.0)
        return out.reshape(logits.shape)
    if temperature != 1.0:  # dividing by 1 changes nothing; skipping it saves an op per decoding step
        scores = scores / temperature
    # The warpers ignore input_ids; they only need 2-D scores.
    if 0 < top_k < k:
        from transformers.generation.logits_process import TopKLogitsWarper

        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        from transformers.generation.logits_process import TopPLogitsWarper

        scores = TopPLogitsWarper(top_p)(None, scores)
    return F.log_softmax(scores, dim=-1).reshape(logits.shape)


def sample_codes(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sample one code per position from the processed distribution.

    Args:
        logits: Code logits ``(..., K)``.
        temperature: See :func:`processed_logprobs`.
        top_k: See :func:`processed_logprobs`.
        top_p: See :func:`processed_logprobs`.
        generator: Random generator for reproducible sampling.

    Returns:
        ``(codes, logp)``, both of shape ``(...)``: the sampled codes (int64) and their log-probabilities under the
        distribution they were sampled from (equal to :func:`code_logprobs` with the same settings).
    """
    logp_all = processed_logprobs(logits, temperature, top_k, top_p)  # (..., K)
    flat = logp_all.reshape(-1, logp_all.shape[-1])  # (N, K)
    codes = torch.multinomial(flat.exp(), 1, generator=generator)  # (N, 1)
    logp = flat.gather(-1, codes)  # (N, 1)
    return codes.view(logits.shape[:-1]), logp.view(logits.shape[:-1])


def code_logprobs(logits: Tensor, codes: Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Tensor:
    """Log-probabilities of given codes under the processed distribution (differentiable in ``logits``).

    Args:
        logits: Code logits ``(..., K)``.
        codes: Code indices ``(...)``.
        temperature: See :func:`processed_logprobs`.
        top_k: See :func:`processed_logprobs`.
        top_p: See :func:`processed_logprobs`.

    Returns:
        Log-probabilities ``(...)``; ``-inf`` for codes outside the kept set.
    """
    if codes.shape != logits.shape[:-1]:
        raise ValueError(f"code_logprobs: codes shape {tuple(codes.shape)} does not match logits "
                         f"{tuple(logits.shape[:-1])}")
    logp_all = processed_logprobs(logits, temperature, top_k, top_p)
    return logp_all.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)


def build_policy(config: LatentPolicyConfig) -> LatentPolicy:
    """Build a :class:`LatentPolicy` from its config."""
    return LatentPolicy(config)
