"""One LightningModule per training phase (YAML ``class_path: latent_mca.phases.<Name>``)."""

from latent_mca.phases.bc import BCModule
from latent_mca.phases.inverse_dynamics import InverseDynamicsModule
from latent_mca.phases.latent_rl import LatentRLModule
from latent_mca.phases.projector import ProjectorModule
from latent_mca.phases.sft import SFTModule
from latent_mca.phases.token_rl import TokenRLModule

__all__ = ["SFTModule", "ProjectorModule", "InverseDynamicsModule", "BCModule", "LatentRLModule", "TokenRLModule"]
