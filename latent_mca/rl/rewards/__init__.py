"""Reward plug-ins: one signature over a batch of completions, NaN for "could not score"."""

from latent_mca.rl.rewards.base import JudgeReward, PairScores, PairwiseJudge, RewardFunction, RewardInput
from latent_mca.rl.rewards.combine import WeightedReward
from latent_mca.rl.rewards.judge import CircuitBreaker, OpenAIJudge, image_data_url, parse_scores
from latent_mca.rl.rewards.metrics import METRICS, ReferenceMetricReward
from latent_mca.rl.rewards.prompts import (
    MMROLE_ASPECTS,
    PCOGALIGN_ASPECTS,
    PROMPT_STYLES,
    MissingMetadataError,
    mmrole_messages,
    pcogalign_messages,
)
from latent_mca.rl.rewards.world import WorldJudge, world_reward

__all__ = [
    "METRICS",
    "MMROLE_ASPECTS",
    "PCOGALIGN_ASPECTS",
    "PROMPT_STYLES",
    "CircuitBreaker",
    "JudgeReward",
    "MissingMetadataError",
    "OpenAIJudge",
    "PairScores",
    "PairwiseJudge",
    "ReferenceMetricReward",
    "RewardFunction",
    "RewardInput",
    "WeightedReward",
    "WorldJudge",
    "image_data_url",
    "mmrole_messages",
    "parse_scores",
    "pcogalign_messages",
    "world_reward",
]
