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
without running the backbone again (:meth:`LatentRollout.policy_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from latent_mca.batch import ChatInputs
from latent_mca.models.backbone import Backbone
from latent_mca.models.codebook import Codebook
from latent_mca.models.policy import LatentPolicy, sample_codes
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
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    token_temperature: float = 0.0


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
    """

    prompt_states: Tensor  # (N, P, d)
    prompt_mask: Tensor  # (N, P)
    tokens: Tensor  # (N, T)
    mask: Tensor  # (N, T)
    states: Tensor  # (N, T, d)
    codes: Tensor  # (N, T)
    code_logp: Tensor  # (N, T)
    finished: Tensor  # (N,)

    @property
    def lengths(self) -> Tensor:
        """Reply lengths in tokens, ``(N,)``."""
        return self.mask.sum(-1)

    def policy_inputs(self) -> tuple[Tensor, Tensor, int]:
        """The state sequence the policy read, its mask, and where the code logits start.

        Returns:
            ``states`` ``(N, P + T - 1, d)``, ``mask`` ``(N, P + T - 1)`` and ``offset = P - 1``: the policy's
            logits at positions ``offset ... offset + T - 1`` scored ``codes[:, 0] ... codes[:, T - 1]``.
        """
        states = torch.cat([self.prompt_states, self.states[:, :-1]], dim=1)  # (N, P+T-1, d)
        mask = torch.cat([self.prompt_mask, self.mask[:, :-1]], dim=1)
        return states, mask, self.prompt_states.shape[1] - 1


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

    def _suppress_image_tokens(self, logits: Tensor) -> Tensor:
        """Image-segment tokens only come from the processor; a reply must never contain one."""
        ids = self.backbone.image_segment_token_ids
        if ids:
            logits = logits.clone()
            logits[..., ids] = float("-inf")
        return logits

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
        pad = self.backbone.pad_token_id
        hidden, state = self.backbone.prefill(prompt.input_ids, prompt.attention_mask, prompt.vision)
        state = state.repeat_interleave(num_samples)
        prompt_states = hidden.repeat_interleave(num_samples, dim=0)  # (N, P, d)
        prompt_mask = prompt.attention_mask.repeat_interleave(num_samples, dim=0)
        logits, pcache = self.policy.prefill(prompt_states, prompt_mask)
        code_logits, e_t = logits[:, -1], prompt_states[:, -1]  # (N, K), (N, d)
        n = prompt_states.shape[0]
        done = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        out = {k: [] for k in ("tokens", "mask", "states", "codes", "logp")}
        redo = None if use_cache else _Recompute(self, prompt, num_samples)
        for _ in range(cfg.max_new_tokens):
            codes, logp = sample_codes(code_logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)  # (N,), (N,)
            tok_logits = self._suppress_image_tokens(self.token_logits(e_t, codes))  # (N, V)
            if cfg.token_temperature > 0:
                probs = torch.softmax(tok_logits.float() / cfg.token_temperature, dim=-1)
                tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                tokens = tok_logits.argmax(-1)
            tokens = torch.where(done, torch.full_like(tokens, pad), tokens)
            out["mask"].append(~done)
            out["tokens"].append(tokens)
            out["codes"].append(codes)
            out["logp"].append(torch.where(done, torch.zeros_like(logp), logp))
            done = done | torch.isin(tokens, eos)
            if redo is None:
                h, state = self.backbone.step(tokens, state)  # (N, 1, d)
                code_logits, pcache = self.policy.step(h, pcache)
                code_logits = code_logits[:, 0]
            else:
                h, code_logits = redo.step(tokens)
            e_t = h[:, 0]
            out["states"].append(e_t)
            if bool(done.all()):
                break
        return LatentRollout(
            prompt_states=prompt_states, prompt_mask=prompt_mask,
            tokens=torch.stack(out["tokens"], 1), mask=torch.stack(out["mask"], 1).long(),
            states=torch.stack(out["states"], 1), codes=torch.stack(out["codes"], 1),
            code_logp=torch.stack(out["logp"], 1), finished=done,
        )


class _Recompute:
    """Cache-free decoding: re-encode the whole sequence each step (the reference the cached path must equal)."""

    def __init__(self, agent: LatentAgent, prompt: ChatInputs, num_samples: int) -> None:
        self.agent = agent
        self.ids = prompt.input_ids.repeat_interleave(num_samples, dim=0)
        self.mask = prompt.attention_mask.repeat_interleave(num_samples, dim=0)
        self.vision = dict(prompt.repeat_interleave(num_samples).vision)

    def step(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens[:, None])], dim=1)
        if "mm_token_type_ids" in self.vision:
            tt = self.vision["mm_token_type_ids"]
            self.vision["mm_token_type_ids"] = torch.cat([tt, torch.zeros_like(tt[:, :1])], dim=1)
        hidden = self.agent.backbone(self.ids, self.mask, self.vision)
        logits = self.agent.policy(hidden, self.mask)
        return hidden[:, -1:], logits[:, -1]
