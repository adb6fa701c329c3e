"""latent_mca: controlling multimodal conversational agents with coverage-enhanced latent actions."""

__version__ = "0.1.0"
