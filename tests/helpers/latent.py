"""Tiny latent-action modules around a test backbone."""

from __future__ import annotations

from latent_mca.models import (
    Codebook,
    CodebookConfig,
    CrossModalProjector,
    InverseDynamics,
    InverseDynamicsConfig,
    LatentPolicy,
    LatentPolicyConfig,
    ProjectorConfig,
    WorldModel,
    WorldModelConfig,
)


def latent_modules(hidden_size: int, num_codes: int = 8, layers: int = 1) -> dict:
    """Projector, inverse model, codebook, world model and policy sized for unit tests."""
    return {
        "projector": CrossModalProjector(ProjectorConfig(hidden_size=hidden_size)),
        "inverse": InverseDynamics(InverseDynamicsConfig(hidden_size=hidden_size, num_layers=layers, num_heads=2,
                                                         num_codes=num_codes)),
        "codebook": Codebook(CodebookConfig(hidden_size=hidden_size, num_codes=num_codes)),
        "world_model": WorldModel(WorldModelConfig(hidden_size=hidden_size, num_blocks=2)),
        "policy": LatentPolicy(LatentPolicyConfig(hidden_size=hidden_size, num_layers=layers, num_heads=2,
                                                  num_codes=num_codes)),
    }
