"""The latent-action agent: backbone + policy + codebook + world model, generating replies.

Per decoding step (batched, no per-row Python work):

1. the backbone's state ``e_t`` of the newest token (KV cache),
2. the policy's code logits for step ``t`` (its own KV cache),
3. a code ``a_t`` sampled with temperature / top-k / top-p (its log-probability is taken under exactly
   that processed distribution),
4. the world model moves the state, ``out_t = e_t + Delta(e_t, c_{a_t})``, and the frozen ``lm_head``
   gives next-token logits,
5. the next token (greedy by default, as in the paper: all exploration comes from the codes),
6. stop at an end-of-turn token or the length limit.

The rollout keeps every state the policy saw, so an RL update can recompute the policy's log-probabilities
without running the backbone again (:meth:`LatentRollout.policy_logits`, which also encodes each prompt once
for its ``G`` samples).

Decoding cost per step is kept close to the backbone's own: the policy's KV cache is preallocated for the
whole reply and written in place, each prompt's policy prefill runs once for its ``G`` samples, the world
model's code half is a ``(K, ...)`` table computed once per call (:meth:`WorldModel.code_features`), and
image-segment (and, before ``min_new_tokens``, end-of-turn) tokens are suppressed by adding a precomputed
``-inf`` bias instead of editing a copy of the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latent_mca.batch import ChatInputs
from latent_mca.models.backbone import Backbone
from latent_mca.models.codebook import Codebook
from latent_mca.models.policy import LatentPolicy, sample_codes
from latent_mca.models.transformer import fast_linear
from latent_mca.models.world_model import WorldModel


@dataclass
class SamplingConfig:
    """How codes and tokens are chosen during generation.

    Attributes:
        max_new_tokens: Length limit of a reply.
        temperature: Code sampling temperature (``<= 0``: the policy's argmax code).
        top_k: Keep the ``top_k`` most likely codes (0: all).
        top_p: Nucleus threshold over codes (1.0: all).
        token_temperature: World-model token temperature; ``<= 0`` (default) decodes greedily.
        min_new_tokens: End-of-turn tokens are suppressed before this many tokens (0: no minimum;
            ``min_new_tokens = max_new_tokens`` gives replies of exactly that length, as benchmarks need).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    token_temperature: float = 0.0
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.min_new_tokens < 0:
            raise ValueError(f"SamplingConfig: need max_new_tokens >= 1 and min_new_tokens >= 0, got "
                             f"{self.max_new_tokens} and {self.min_new_tokens}")


@dataclass
class LatentRollout:
    """What a latent generation produced, row by row (``N = B x num_samples``, rows grouped by prompt).

    Attributes:
        prompt_states: Backbone states of the left-padded prompts, ``(N, P, d)``.
        prompt_mask: Prompt attention mask, ``(N, P)``.
        tokens: Generated token ids (padding after the end), ``(N, T)``.
        mask: 1 for generated tokens up to and including the end-of-turn token, ``(N, T)``.
        states: Backbone state after each generated token, ``(N, T, d)``.
        codes: Code that produced each token, ``(N, T)``.
        code_logp: Its log-probability under the sampling distribution, ``(N, T)``.
        finished: Whether the row emitted an end-of-turn token (False: truncated at the limit), ``(N,)``.
        num_samples: Rows per prompt: rows ``i*num_samples ... (i+1)*num_samples - 1`` share one prompt
            (1: unknown or one sample each). Only a hint for :meth:`policy_logits`, which checks it.
    """

    prompt_states: Tensor  # (N, P, d)
    prompt_mask: Tensor  # (N, P)
    tokens: Tensor  # (N, T)
    mask: Tensor  # (N, T)
    states: Tensor  # (N, T, d)
    codes: Tensor  # (N, T)
    code_logp: Tensor  # (N, T)
    finished: Tensor  # (N,)
    num_samples: int = 1

    @property
    def lengths(self) -> Tensor:
        """Reply lengths in tokens, ``(N,)``."""
        return self.mask.sum(-1)

    def select(self, rows: Tensor) -> LatentRollout:
        """The given rows (a 1-D index tensor); keep whole groups in order to keep ``num_samples`` meaningful."""
        rows = rows.to(self.tokens.device)
        return LatentRollout(self.prompt_states[rows], self.prompt_mask[rows], self.tokens[rows], self.mask[rows],
                             self.states[rows], self.codes[rows], self.code_logp[rows], self.finished[rows],
                             self.num_samples)

    @staticmethod
    def cat(parts: Sequence[LatentRollout]) -> LatentRollout:
        """Stack rollouts of different prompt and reply lengths (DAPO's refilled batch).

        Prompts stay left-padded (padded on the left to the longest), replies right-padded; padding is masked
        out, so the policy's logits at real positions are those of each part alone.
        """
        if not parts:
            raise ValueError("LatentRollout.cat needs at least one rollout")
        if len({r.num_samples for r in parts}) != 1:
            raise ValueError(f"cannot stack rollouts with different num_samples: {[r.num_samples for r in parts]}")
        p = max(r.prompt_states.shape[1] for r in parts)
        t = max(r.tokens.shape[1] for r in parts)

        def left(x: Tensor, width: int) -> Tensor:  # pad dim 1 on the left up to `width`
            pad = [0, 0] * (x.dim() - 2) + [width - x.shape[1], 0]
            return F.pad(x, pad)

        def right(x: Tensor, width: int) -> Tensor:  # pad dim 1 on the right up to `width`
            pad = [0, 0] * (x.dim() - 2) + [0, width - x.shape[1]]
            return F.pad(x, pad)

        return LatentRollout(
            prompt_states=torch.cat([left(r.prompt_states, p) for r in parts]),  # (N, P, d)
            prompt_mask=torch.cat([left(r.prompt_mask, p) for r in parts]),
            tokens=torch.cat([right(r.tokens, t) for r in parts]),  # (N, T)
            mask=torch.cat([right(r.mask, t) for r in parts]),
            states=torch.cat([right(r.states, t) for r in parts]),  # (N, T, d)
            codes=torch.cat([right(r.codes, t) for r in parts]),
            code_logp=torch.cat([right(r.code_logp, t) for r in parts]),
            finished=torch.cat([r.finished for r in parts]),
            num_samples=parts[0].num_samples,
        )

    def policy_inputs(self) -> tuple[Tensor, Tensor, int]:
        """The state sequence the policy read, its mask, and where the code logits start.

        Returns:
            ``states`` ``(N, P + T - 1, d)``, ``mask`` ``(N, P + T - 1)`` and ``offset = P - 1``: the policy's
            logits at positions ``offset ... offset + T - 1`` scored ``codes[:, 0] ... codes[:, T - 1]``.
        """
        states = torch.cat([self.prompt_states, self.states[:, :-1]], dim=1)  # (N, P+T-1, d)
        mask = torch.cat([self.prompt_mask, self.mask[:, :-1]], dim=1)
        return states, mask, self.prompt_states.shape[1] - 1

    def prompt_group_size(self) -> int:
        """``num_samples`` if every group of that many rows really shares its prompt, else 1."""
        g, n = self.num_samples, self.prompt_states.shape[0]
        if g <= 1 or n % g:
            return 1
        states = self.prompt_states.unflatten(0, (n // g, g))  # (B, G, P, d)
        mask = self.prompt_mask.unflatten(0, (n // g, g))  # (B, G, P)
        same = torch.equal(states, states[:, :1].expand_as(states)) and torch.equal(mask, mask[:, :1].expand_as(mask))
        return g if same else 1

    def policy_logits(self, policy: LatentPolicy) -> Tensor:
        """The policy's code logits for every generated step, ``(N, T, K)`` (differentiable in the policy).

        The same values as ``policy(*policy_inputs()[:2])[:, offset:]``, computed with each prompt encoded
        once for its samples: the prompt is prefilled once per group (:meth:`LatentPolicy.prefill`), its
        cache repeated per sample, and each sample's states extended after it (:meth:`LatentPolicy.extend`).
        Gradients reaching the shared prompt from the ``G`` samples add up, exactly as when the prompt is
        repeated. Only with dropout do the two differ (one dropout mask per prompt instead of one per sample).

        Args:
            policy: The policy to score with (the trained one or a frozen reference).

        Returns:
            Logits ``(N, T, K)``; row ``i``, step ``t`` scores ``codes[i, t]``.
        """
        g = self.prompt_group_size()
        logits, cache = policy.prefill(self.prompt_states[::g], self.prompt_mask[::g])  # (B, P, K)
        first = logits[:, -1:].repeat_interleave(g, dim=0)  # (N, 1, K): the last prompt state scores step 0
        if self.states.shape[1] < 2:
            return first
        rest, _ = policy.extend(self.states[:, :-1], cache.repeat_interleave(g), self.mask[:, :-1])  # (N, T-1, K)
        return torch.cat([first, rest], dim=1)


class LatentAgent(nn.Module):
    """Compose the frozen backbone with the latent modules for generation.

    Args:
        backbone: The VLM backbone (its ``lm_head`` reads the world model's output).
        policy: The latent policy.
        codebook: The code table.
        world_model: The merge blocks.
    """

    def __init__(self, backbone: Backbone, policy: LatentPolicy, codebook: Codebook, world_model: WorldModel) -> None:
        super().__init__()
        self.backbone = backbone
        self.policy = policy
        self.codebook = codebook
        self.world_model = world_model

    def token_logits(self, states: Tensor, codes: Tensor) -> Tensor:
        """World-model next-token logits for states ``(..., d)`` and codes ``(...)``."""
        return self.backbone.lm_head(self.world_model(states, self.codebook.embed(codes)))

    def _token_bias(self, like: Tensor, extra_ids: Sequence[int] = ()) -> Tensor:
        """``(V,)`` additive bias, ``V = like.shape[-1]``: ``-inf`` on image-segment tokens and ``extra_ids``."""
        bias = torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device)
        ids = [*self.backbone.image_segment_token_ids, *extra_ids]
        if ids:
            bias[ids] = float("-inf")
        return bias

    def _suppress_image_tokens(self, logits: Tensor) -> Tensor:
        """Image-segment tokens only come from the processor; a reply must never contain one."""
        return logits + self._token_bias(logits)

    def _next_tokens(self, e_t: Tensor, codes: Tensor, table: Tensor, bias: Tensor, cfg: SamplingConfig,
                     generator: torch.Generator | None) -> Tensor:
        """Tokens ``(N,)`` the world model emits from states ``(N, d)`` and codes (code halves from ``table``)."""
        logits = fast_linear(self.backbone.lm_head, self.world_model.merge(e_t, table[codes])) + bias  # (N, V)
        if cfg.token_temperature > 0:
            probs = torch.softmax(logits.float() / cfg.token_temperature, dim=-1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return logits.argmax(-1)

    @torch.no_grad()
    def generate(self, prompt: ChatInputs, sampling: SamplingConfig | None = None, num_samples: int = 1,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> LatentRollout:
        """Generate ``num_samples`` replies per prompt.

        Args:
            prompt: Left-padded prompts ending with the assistant prefix.
            sampling: Code and token sampling settings.
            num_samples: Replies per prompt (rows come out grouped by prompt).
            generator: Random generator for reproducible sampling.
            use_cache: Decode with KV caches (False re-encodes the whole sequence every step; for tests).

        Returns:
            The rollout.
        """
        cfg = sampling or SamplingConfig()
        eos = torch.tensor(self.backbone.eos_token_ids, device=prompt.input_ids.device)
        hidden, state = self.backbone.prefill(prompt.input_ids, prompt.attention_mask, prompt.vision)
        prompt_states = hidden.repeat_interleave(num_samples, dim=0)  # (N, P, d)
        prompt_mask = prompt.attention_mask.repeat_interleave(num_samples, dim=0)
        decoder = (_Cached(self, prompt, hidden, state, num_samples, cfg.max_new_tokens) if use_cache
                   else _Recompute(self, prompt, num_samples, prompt_states))
        code_logits, e_t = decoder.first_logits, prompt_states[:, -1]  # (N, K), (N, d)
        all_codes = self.codebook.embed(torch.arange(self.codebook.num_codes, device=hidden.device))  # (K, d)
        table = self.world_model.code_features(all_codes.to(hidden.dtype))  # (K, blocks, 2w)
        like = hidden.new_empty(self.backbone.vocab_size)
        bias, bias_early = self._token_bias(like), self._token_bias(like, self.backbone.eos_token_ids)
        done = torch.zeros(prompt_states.shape[0], dtype=torch.bool, device=hidden.device)
        out = {k: [] for k in ("tokens", "mask", "states", "codes", "logp")}
        for i in range(cfg.max_new_tokens):
            codes, logp = sample_codes(code_logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)  # (N,), (N,)
            tokens = self._next_tokens(e_t, codes, table, bias_early if i < cfg.min_new_tokens else bias, cfg,
                                       generator).masked_fill(done, self.backbone.pad_token_id)
            out["mask"].append(~done)
            out["tokens"].append(tokens)
            out["codes"].append(codes)
            out["logp"].append(logp.masked_fill(done, 0.0))
            done = done | torch.isin(tokens, eos)
            h, code_logits = decoder.step(tokens)  # (N, 1, d), (N, K)
            e_t = h[:, 0]
            out["states"].append(e_t)
            if bool(done.all()):
                break
        return LatentRollout(
            prompt_states=prompt_states, prompt_mask=prompt_mask,
            tokens=torch.stack(out["tokens"], 1), mask=torch.stack(out["mask"], 1).long(),
            states=torch.stack(out["states"], 1), codes=torch.stack(out["codes"], 1),
            code_logp=torch.stack(out["logp"], 1), finished=done, num_samples=num_samples,
        )


class _Cached:
    """Incremental decoding with the backbone's and the policy's KV caches (each prompt prefilled once)."""

    def __init__(self, agent: LatentAgent, prompt: ChatInputs, hidden: Tensor, state: Any, num_samples: int,
                 max_new_tokens: int) -> None:
        # The policy's cache is sized for the whole reply (written in place) and repeated per sample.
        max_length = prompt.attention_mask.shape[1] + max_new_tokens
        logits, cache = agent.policy.prefill(hidden, prompt.attention_mask, max_length=max_length)
        self.agent, self.state = agent, state.repeat_interleave(num_samples)
        self.cache = cache.repeat_interleave(num_samples)
        self.first_logits = logits[:, -1].repeat_interleave(num_samples, dim=0)  # (N, K)

    def step(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        h, self.state = self.agent.backbone.step(tokens, self.state)  # (N, 1, d)
        logits, self.cache = self.agent.policy.step(h, self.cache)
        return h, logits[:, 0]


class _Recompute:
    """Cache-free decoding: re-encode the whole sequence each step (the reference the cached path must equal)."""

    def __init__(self, agent: LatentAgent, prompt: ChatInputs, num_samples: int, prompt_states: Tensor) -> None:
        self.agent = agent
        self.ids = prompt.input_ids.repeat_interleave(num_samples, dim=0)
        self.mask = prompt.attention_mask.repeat_interleave(num_samples, dim=0)
        self.vision = dict(prompt.repeat_interleave(num_samples).vision)
        self.first_logits = agent.policy(prompt_states, self.mask)[:, -1]  # (N, K)

    def step(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens[:, None])], dim=1)
        if "mm_token_type_ids" in self.vision:
            tt = self.vision["mm_token_type_ids"]
            self.vision["mm_token_type_ids"] = torch.cat([tt, torch.zeros_like(tt[:, :1])], dim=1)
        hidden = self.agent.backbone(self.ids, self.mask, self.vision)
        logits = self.agent.policy(hidden, self.mask)
        return hidden[:, -1:], logits[:, -1]
