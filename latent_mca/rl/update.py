"""What latent and token RL share between a rollout and an optimiser step: config, rewards, advantages.

Both :class:`~latent_mca.phases.latent_rl.LatentRLModule` (actions = latent codes) and
:class:`~latent_mca.phases.token_rl.TokenRLModule` (actions = vocabulary tokens) call :func:`score_rollouts`
and :func:`prepare_advantages`, then :func:`~latent_mca.rl.losses.policy_loss` once per PPO iteration.
The algorithm is one config key (``rl.algorithm``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from latent_mca.batch import DialogueBatch
from latent_mca.rl.advantages import (
    DEFAULT_SCALE,
    dynamic_sampling_mask,
    group_advantages,
    overlong_penalty,
    valid_reward_mask,
)
from latent_mca.rl.dynamic import GroupRefill
from latent_mca.rl.losses import Algorithm
from latent_mca.rl.rewards.base import RewardFunction, RewardInput


@dataclass
class RLConfig:
    """The GRPO-family settings shared by latent and token RL.

    Attributes:
        algorithm: ``grpo``, ``dr_grpo``, ``dapo`` or ``bnpo`` (loss aggregation, as TRL's ``loss_type``).
        num_generations: Completions sampled per prompt (the group size G).
        max_new_tokens: Completion length limit (also Dr.GRPO's normaliser).
        temperature: Sampling temperature of the actions (codes or tokens).
        top_k: Top-k truncation of the action distribution (0: none).
        top_p: Nucleus truncation of the action distribution (1.0: none).
        beta: Weight of the k3 KL to the frozen reference policy (0: no reference is kept).
        epsilon_low: Lower clip width.
        epsilon_high: Upper clip width (None: ``epsilon_low``, or 0.28 for DAPO).
        scale_rewards: ``group``, ``batch`` or ``none`` (None: the algorithm's default; Dr.GRPO uses none).
        num_iterations: Optimiser steps per rollout batch (PPO-style reuse with the rollout's log-probs as old).
        mask_truncated_completions: Drop completions that hit the length limit from the loss.
        dynamic_sampling: Drop groups whose rewards are all equal and refill the update from the next data
            batches (DAPO; :mod:`latent_mca.rl.dynamic`). ``max_steps`` then counts updates, not batches.
        dynamic_sampling_max_batches: Data batches drawn at most for one update under dynamic sampling; when
            reached, the update uses the groups kept so far (the shortfall is logged as ``train/groups_short``).
        overlong_cache: Soft overlong penalty window L_cache in tokens (0: off; DAPO uses it).
    """

    algorithm: Algorithm = "grpo"
    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    scale_rewards: Literal["group", "batch", "none"] | None = None
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    dynamic_sampling: bool = False
    dynamic_sampling_max_batches: int = 3
    overlong_cache: int = 0

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError("rl.num_generations must be >= 2: group-relative advantages need a group")
        if self.num_iterations < 1:
            raise ValueError("rl.num_iterations must be >= 1")
        if self.dynamic_sampling_max_batches < 1:
            raise ValueError("rl.dynamic_sampling_max_batches must be >= 1")
        if not 0 <= self.overlong_cache < self.max_new_tokens:
            raise ValueError("rl.overlong_cache must be in [0, max_new_tokens)")

    @property
    def scale(self) -> str:
        """The advantage scaling actually used."""
        return self.scale_rewards or DEFAULT_SCALE[self.algorithm]


# Phase hyper-parameters (and so Lightning checkpoints) hold this dataclass: allow it when a checkpoint is resumed
# with torch.load(weights_only=True), Lightning's default.
torch.serialization.add_safe_globals([RLConfig])


def reward_inputs(batch: DialogueBatch, completions: Sequence[str], group_size: int) -> list[RewardInput]:
    """One :class:`RewardInput` per completion; completions are grouped by prompt (``group_size`` each)."""
    if len(completions) != batch.batch_size * group_size:
        raise ValueError(f"{len(completions)} completions for {batch.batch_size} prompts x {group_size}")
    out = []
    for i, text in enumerate(completions):
        row = i // group_size
        out.append(RewardInput(prompt=batch.messages[row], completion=text, reference=batch.references[row],
                               image=batch.images[row], metadata=batch.metadata[row],
                               key=f"{batch.keys[row]}#{i % group_size}"))
    return out


def score_rollouts(reward: RewardFunction, batch: DialogueBatch, completions: Sequence[str],
                   group_size: int) -> Tensor:
    """Rewards ``(N,)`` as float32; NaN where the reward function could not score (never 0)."""
    values = reward(reward_inputs(batch, completions, group_size))
    if len(values) != len(completions):
        raise ValueError(f"reward {getattr(reward, 'name', reward)!r} returned {len(values)} values for "
                         f"{len(completions)} completions")
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)


@dataclass
class Advantages:
    """Advantages and the rows that take part in the loss.

    Attributes:
        advantages: Per completion ``(N,)``.
        row_mask: Completions that count ``(N,)`` bool (scored, in a kept group, not truncated if so set).
        rewards: The rewards used, overlong penalty included ``(N,)``.
        stats: Scalars to log.
    """

    advantages: Tensor
    row_mask: Tensor
    rewards: Tensor
    stats: dict[str, float]


def prepare_advantages(rewards: Tensor, lengths: Tensor, finished: Tensor, cfg: RLConfig,
                       gather: Callable[[Tensor], Tensor] | None = None) -> Advantages:
    """Turn rewards into group-relative advantages under the configured algorithm's options.

    Args:
        rewards: Raw rewards ``(N,)`` (NaN = could not score).
        lengths: Completion lengths ``(N,)``.
        finished: Whether each completion ended with an end-of-turn token ``(N,)``.
        cfg: RL settings.
        gather: Gathers a per-row tensor from every rank (needed for ``batch`` scaling on several ranks).

    Returns:
        The advantages, the rows that count, and statistics.
    """
    g = cfg.num_generations
    rewards = rewards.to(torch.float32).clone()
    raw_mean = torch.nanmean(rewards)
    if cfg.overlong_cache:
        rewards = rewards + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_cache).to(rewards)
    if cfg.scale == "batch":
        # Centre on the group mean, divide by the std of every valid reward of the step (all ranks).
        pool = gather(rewards) if gather is not None else rewards
        pool = pool[~torch.isnan(pool)]
        std = pool.std() if pool.numel() > 1 else pool.new_zeros(())
        adv = group_advantages(rewards, g, "none") / (std + 1e-4)
    else:
        adv = group_advantages(rewards, g, cfg.scale)
    row_mask = valid_reward_mask(rewards)
    kept_groups = torch.ones_like(row_mask)
    if cfg.dynamic_sampling:
        kept_groups = dynamic_sampling_mask(rewards, g)
        row_mask = row_mask & kept_groups
    if cfg.mask_truncated_completions:
        row_mask = row_mask & finished.bool()
    stats = {
        "reward": float(raw_mean),
        "reward_std": float(torch.nan_to_num(rewards.view(-1, g).std(-1), nan=0.0).mean()),
        "unscored": float(torch.isnan(rewards).float().sum()),
        "groups_kept": float(kept_groups.view(-1, g)[:, 0].float().mean()),
        "truncated": float((~finished.bool()).float().mean()),
        "completion_length": float(lengths.float().mean()),
    }
    return Advantages(advantages=adv, row_mask=row_mask, rewards=rewards, stats=stats)


def decode_completions(tokenizer: Any, tokens: Tensor, mask: Tensor) -> list[str]:
    """Completion texts (special tokens dropped) from padded token ids and their mask."""
    rows = [t[m.bool()].tolist() for t, m in zip(tokens.cpu(), mask.cpu())]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def optimise(module: Any, logp_fn: Callable[[], Tensor], old: Tensor | None, ref: Tensor | None, adv: Advantages,
             mask: Tensor, cfg: RLConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``cfg.num_iterations`` manual optimiser steps of the clipped policy loss on one rollout batch.

    Args:
        module: The LightningModule (manual optimisation).
        logp_fn: Recomputes the actions' log-probabilities ``(N, T)`` under the current policy, with gradients.
        old: Log-probabilities at rollout time (None: on-policy, the first recomputation is used).
        ref: Reference log-probabilities for the KL term (None: no KL).
        adv: Advantages and the rows that count.
        mask: Action mask ``(N, T)`` (rows outside ``adv.row_mask`` already zeroed).
        cfg: RL settings.

    Returns:
        The last loss and its statistics.
    """
    from latent_mca.rl.losses import policy_loss

    tokens = module.trainer.strategy.reduce(mask.sum().float(), reduce_op="sum")
    opt = module.optimizers()
    loss, stats = torch.zeros((), device=mask.device), {}
    for _ in range(cfg.num_iterations):
        opt.zero_grad(set_to_none=True)
        if float(tokens) == 0:
            # Nothing scored on any rank (e.g. a judge outage): take an empty step so the step count (and the
            # data position derived from it) advances, without moving the weights (AdamW would still decay them).
            opt.step()
            continue
        logp = logp_fn()
        loss, stats = policy_loss(
            logp, old, ref, adv.advantages, mask, algorithm=cfg.algorithm, epsilon_low=cfg.epsilon_low,
            epsilon_high=cfg.epsilon_high, beta=cfg.beta, max_completion_length=cfg.max_new_tokens,
            num_items_in_batch=tokens, world_size=module.trainer.world_size)
        module.manual_backward(loss)
        opt.step()
    scheduler = module.lr_schedulers()
    if scheduler is not None:
        scheduler.step()
    stats = dict(stats)
    stats["empty_step"] = torch.tensor(float(float(tokens) == 0))
    return loss, stats


def log_step(module: Any, loss: Tensor, adv: Advantages, stats: dict[str, Tensor], reward: Any,
             rows: int) -> None:
    """Log an RL step: loss, reward statistics, loss statistics and the reward function's own counters."""
    module.log("train/loss", loss.detach(), batch_size=rows)
    module.log("train/reward", adv.stats["reward"], prog_bar=True, batch_size=rows)
    module.log_dict({f"train/{k}": v for k, v in adv.stats.items() if k != "reward"}, batch_size=rows)
    module.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=rows)
    counters = reward.stats() if hasattr(reward, "stats") else {}
    numeric = {f"reward/{k}": float(v) for k, v in counters.items() if isinstance(v, int | float)}
    if numeric:  # judge failures, retries, breaker trips... visible next to the reward they explain
        module.log_dict(numeric, batch_size=rows)


def advantages_for_update(module: Any, cfg: RLConfig, buffer: GroupRefill | None, payload: Any, rewards: Tensor,
                          lengths: Tensor, finished: Tensor, prompts: int) -> tuple[Any, Advantages] | None:
    """The batch an RL step updates on, and its advantages.

    Without dynamic sampling (``buffer`` None) that is this step's rollout. With it, the rollout's informative
    groups join ``buffer``, and the batch is the buffer's content once every rank holds ``prompts`` groups (or
    has drawn ``rl.dynamic_sampling_max_batches`` batches): ranks decide together, since an update runs
    collective calls.

    Args:
        module: The RL LightningModule (for the strategy, logging and gathering).
        cfg: RL settings.
        buffer: DAPO's buffer across steps, or None.
        payload: This step's rollout (whatever the module updates from), rows grouped by prompt.
        rewards: Its rewards ``(N,)``; ``lengths`` and ``finished`` likewise ``(N,)``.
        lengths: Completion lengths ``(N,)``.
        finished: Whether each completion ended with an end-of-turn token ``(N,)``.
        prompts: Prompts per data batch (groups per update).

    Returns:
        ``(payload, advantages)`` to update on, or None when this step only samples (no optimiser step).
    """
    sampled: dict[str, float] = {}
    if buffer is not None:
        buffer.add(payload, rewards, lengths, finished)
        waiting = torch.tensor(float(not buffer.ready(prompts)), device=rewards.device)
        if float(module.trainer.strategy.reduce(waiting, reduce_op="sum")) > 0:
            module.log("train/sampling_kept_groups", float(buffer.kept_groups), batch_size=int(rewards.numel()))
            return None
        filled = buffer.pop(prompts)
        payload, rewards, lengths, finished, sampled = (filled.payload, filled.rewards, filled.lengths,
                                                        filled.finished, filled.stats)
    rows = prompts * cfg.num_generations
    adv = prepare_advantages(rewards, lengths, finished, cfg, gather=lambda v: gather_rows(module, v, rows))
    adv.stats.update(sampled)
    return payload, adv


def gather_rows(module: Any, values: Tensor, rows: int) -> Tensor:
    """Per-row values of every rank, flattened, each rank's NaN-padded to ``rows`` first.

    Ranks may hold different numbers of rows under dynamic sampling; NaN rows are ignored wherever these are
    pooled (batch-scaled advantages).
    """
    if module.trainer.world_size == 1:
        return values
    if values.numel() > rows:
        raise ValueError(f"{values.numel()} rows exceed the gather size {rows}")
    padded = torch.cat([values, values.new_full((rows - values.numel(),), float("nan"))])
    return module.all_gather(padded).reshape(-1)
