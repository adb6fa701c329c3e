"""The RL update benchmark: one latent policy update against one token-level update on the same batch.

Both sides start from a finished rollout of ``B`` prompts x ``G`` replies x ``new_tokens`` tokens (not
timed) and time exactly what their phase does per PPO iteration, through the phases' own methods:

* ours (:class:`~latent_mca.phases.latent_rl.LatentRLModule`): ``code_logp`` (the policy over the states
  recorded during the rollout, each prompt encoded once for its ``G`` samples; the backbone does not run),
  ``policy_loss``, backward, AdamW step over the policy;
* baseline (:class:`~latent_mca.phases.token_rl.TokenRLModule`): ``token_logp`` (a backbone forward over
  prompt + completion, vision tower included, then ``lm_head`` and the vocabulary log-softmax),
  ``policy_loss``, backward through the trainable backbone, AdamW step.

Algorithm GRPO, ``beta = 0`` (no reference pass on either side), one iteration, random advantages: the
values do not change the work done.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from latent_mca.batch import ChatInputs
from latent_mca.bench.common import (
    BenchContext,
    Target,
    check_length,
    conversations,
    generation_prompts,
    latent_agent,
)
from latent_mca.bench.decode import FIXED_LENGTH_NOTE
from latent_mca.models import Backbone, BackboneConfig
from latent_mca.models.agent import SamplingConfig

#: A latent update should cost at most half a token update (the authors' code: 0.86x).
RL_STEP_TARGET = Target(op="<=", value=0.5, paper=0.86)
LR = 1e-6  # small: the weights keep changing step after step without drifting anywhere numerically odd


def full_sequence(prompt: ChatInputs, completion: torch.Tensor) -> ChatInputs:
    """Prompt + completion as the token update reads it (image token types extended with text)."""
    vision = dict(prompt.vision)
    if "mm_token_type_ids" in vision:
        vision["mm_token_type_ids"] = torch.cat([vision["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    mask = torch.ones_like(completion, dtype=prompt.attention_mask.dtype)
    return ChatInputs(input_ids=torch.cat([prompt.input_ids, completion], dim=1),
                      attention_mask=torch.cat([prompt.attention_mask, mask], dim=1), vision=vision)


def _modules(ctx: BenchContext, rl: Any) -> tuple[Any, Any]:
    """The two phase modules, with the bench's reward stand-in and a small learning rate."""
    from latent_mca.phases.latent_rl import LatentRLModule
    from latent_mca.phases.token_rl import TokenRLModule
    from latent_mca.rl.rewards.world import world_reward

    optimizer = functools.partial(torch.optim.AdamW, lr=LR)
    path = str(ctx.path)
    top_n = ctx.sizes.backbone.num_layers if ctx.token_trainable == "top_n" else 0
    latent = LatentRLModule(BackboneConfig(path=path), init_from=path, reward=world_reward(), rl=rl,
                            optimizer=optimizer)
    token = TokenRLModule(BackboneConfig(path=path, trainable=ctx.token_trainable, top_n_layers=top_n),
                          reward=world_reward(), rl=rl, optimizer=optimizer)
    return latent, token


def bench_rl_step(ctx: BenchContext) -> dict[str, Any]:
    """Time of one latent RL update vs one token RL update on rollouts of the same size.

    Args:
        ctx: Sizes, backbone and measurement settings.

    Returns:
        The result record.
    """
    from latent_mca.phases.latent_rl import LOGP_FLOOR
    from latent_mca.rl.losses import policy_loss
    from latent_mca.rl.update import RLConfig

    sizes, frozen = ctx.sizes, ctx.backbone
    b, g, t = sizes.batch_size, sizes.group_size, sizes.new_tokens
    rl = RLConfig(algorithm="grpo", num_generations=g, max_new_tokens=t)
    agent = latent_agent(frozen, sizes, ctx.seed)
    prompts = generation_prompts(frozen, conversations(b, sizes.backbone.image_size, ctx.seed))
    latent, token = _modules(ctx, rl)
    # The token side trains its own copy of the backbone, loaded from the same checkpoint.
    token.backbone = Backbone.from_pretrained(token.backbone_config)
    rollout = agent.generate(prompts, SamplingConfig(max_new_tokens=t, temperature=rl.temperature, min_new_tokens=t),
                             num_samples=g, generator=ctx.generator())
    completion = token.backbone.generate(prompts.input_ids, prompts.attention_mask, prompts.vision,
                                         max_new_tokens=t, min_new_tokens=t, temperature=rl.temperature,
                                         num_return_sequences=g)
    check_length("latent rollout", rollout.tokens.shape[1], t)
    check_length("token rollout", completion.shape[1], t)
    latent.policy = agent.policy.train()
    token.backbone.train()
    opts = {"ours": latent.configure_optimizers(), "baseline": token.configure_optimizers()}
    n = b * g
    advantages = torch.randn(n, generator=ctx.generator())
    mask = torch.ones(n, t)
    old = rollout.code_logp.clamp_min(LOGP_FLOOR)
    full = full_sequence(prompts.repeat_interleave(g), completion)
    p = prompts.input_ids.shape[1]

    def update(key: str, logp: torch.Tensor, old_logp: torch.Tensor | None) -> None:
        loss, _ = policy_loss(logp, old_logp, None, advantages, mask, algorithm=rl.algorithm,
                              epsilon_low=rl.epsilon_low, epsilon_high=rl.epsilon_high, beta=rl.beta,
                              max_completion_length=t, num_items_in_batch=mask.sum())
        opts[key].zero_grad()
        loss.backward()
        opts[key].step()

    def ours() -> None:
        update("ours", latent.code_logp(latent.policy, rollout), old)

    def baseline() -> None:
        update("baseline", token.token_logp(token.backbone, full, p, completion), None)

    def count(params: Any) -> int:
        return sum(x.numel() for x in params if x.requires_grad)

    return ctx.measure(
        "rl-step", "one RL policy update (rollout excluded), latent vs token", ours, baseline,
        {"ours": "LatentRLModule: policy over recorded states + loss + backward + AdamW",
         "baseline": f"TokenRLModule: backbone forward (trainable={ctx.token_trainable}) + loss + backward + AdamW"},
        tokens=n * t, target=RL_STEP_TARGET,
        sizes={"prompt_length": p, "rows": n, "trainable_params_ours": count(latent.policy.parameters()),
               "trainable_params_baseline": count(token.backbone.parameters()),
               "token_trainable": ctx.token_trainable},
        notes=[FIXED_LENGTH_NOTE, "algorithm grpo, beta 0, one iteration; tokens/s = completion tokens updated per s"])
