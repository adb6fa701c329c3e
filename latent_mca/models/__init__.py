"""Plain ``nn.Module`` building blocks (no Lightning): the backbone door and the latent-action modules."""

from latent_mca.models.backbone import Backbone, BackboneConfig, DecodeState, SpecialTokens
from latent_mca.models.codebook import (
    Codebook,
    CodebookConfig,
    build_codebook,
    code_usage_stats,
    straight_through_sample,
)
from latent_mca.models.inverse_dynamics import (
    InverseDynamics,
    InverseDynamicsConfig,
    InverseDynamicsOutput,
    build_inverse_dynamics,
    inverse_entropy_terms,
)
from latent_mca.models.policy import (
    LatentPolicy,
    LatentPolicyConfig,
    build_policy,
    code_logprobs,
    processed_logprobs,
    sample_codes,
)
from latent_mca.models.projector import (
    CrossModalProjector,
    Gaussian,
    GaussianHead,
    ProjectorConfig,
    build_projector,
    gaussian_nll,
)
from latent_mca.models.transformer import CausalTransformer, CausalTransformerConfig, KVCache
from latent_mca.models.world_model import WorldModel, WorldModelConfig, build_world_model

__all__ = [
    "Backbone", "BackboneConfig", "DecodeState", "SpecialTokens",
    "CausalTransformer", "CausalTransformerConfig", "KVCache",
    "CrossModalProjector", "ProjectorConfig", "Gaussian", "GaussianHead", "gaussian_nll", "build_projector",
    "Codebook", "CodebookConfig", "straight_through_sample", "code_usage_stats", "build_codebook",
    "InverseDynamics", "InverseDynamicsConfig", "InverseDynamicsOutput", "inverse_entropy_terms",
    "build_inverse_dynamics",
    "WorldModel", "WorldModelConfig", "build_world_model",
    "LatentPolicy", "LatentPolicyConfig", "sample_codes", "code_logprobs", "processed_logprobs", "build_policy",
]
