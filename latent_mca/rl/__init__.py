"""Shared RL math: group-relative advantages, the GRPO-family losses and reward plug-ins (``rl.rewards``)."""

from latent_mca.rl.advantages import (
    DEFAULT_SCALE,
    completion_mask_from_eos,
    dynamic_sampling_mask,
    group_advantages,
    overlong_penalty,
    truncation_mask,
    valid_reward_mask,
)
from latent_mca.rl.losses import ALGORITHMS, DAPO_EPSILON_HIGH, aggregate, policy_loss, resolve_epsilon_high

__all__ = [
    "ALGORITHMS",
    "DAPO_EPSILON_HIGH",
    "DEFAULT_SCALE",
    "aggregate",
    "completion_mask_from_eos",
    "dynamic_sampling_mask",
    "group_advantages",
    "overlong_penalty",
    "policy_loss",
    "resolve_epsilon_high",
    "truncation_mask",
    "valid_reward_mask",
]
