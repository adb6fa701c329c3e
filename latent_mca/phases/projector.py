"""Stage 1a: initialise the cross-modal projector on paired data.

L_proj1 = L_t2vt + L_vt2t, with L_t2vt = NLL(P(e^T); e^{VT}) and L_vt2t = NLL(P'(e^{VT}); e^T): diagonal
Gaussian regression in both directions, per token, on the text tokens shared by the two views.

Launch::

    python -m latent_mca fit --config configs/demo/projector.yaml
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from latent_mca.batch import PairedBatch
from latent_mca.models import BackboneConfig, CrossModalProjector, ProjectorConfig, gaussian_nll
from latent_mca.phases.base import PhaseModule
from latent_mca.phases.states import paired_states


class ProjectorModule(PhaseModule):
    """Gaussian regression of the forward (text -> image-text) and backward projectors.

    Args:
        backbone: The frozen VLM backbone.
        bottleneck: Width of the projector MLPs' middle layer (None: ``d // 2``, the paper's shape).
        residual: Residual means starting at the identity (False: the authors' head, ``mu = MLP(x)``).
        optimizer: Optimiser factory.
        lr_scheduler: Optional scheduler factory.
        init_from: A previous export holding a projector to continue from (optional).
        export_dir: Where the export is written at the end of ``fit``.
    """

    phase = "projector"

    def __init__(self, backbone: BackboneConfig, bottleneck: int | None = None, residual: bool = True,
                 optimizer: OptimizerCallable = torch.optim.AdamW, lr_scheduler: LRSchedulerCallable | None = None,
                 init_from: str | None = None, export_dir: str | None = None) -> None:
        super().__init__(backbone, optimizer, lr_scheduler, init_from, export_dir)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.bottleneck = bottleneck
        self.residual = residual
        self.projector: CrossModalProjector | None = None

    def build_modules(self) -> None:
        """Create the projector (or load it from ``init_from``)."""
        if self.parent is not None and self.parent.has("projector"):
            self.projector = self.parent.build("projector", ProjectorConfig, CrossModalProjector)
        else:
            config = ProjectorConfig(self.backbone.hidden_size, self.bottleneck, self.residual)
            self.projector = CrossModalProjector(config)

    def export_modules(self) -> dict[str, tuple[nn.Module, Any]]:
        """The projector."""
        return {"projector": (self.projector, self.projector.config)}

    def losses(self, batch: PairedBatch) -> dict[str, Tensor]:
        """Both Gaussian NLL terms on a paired batch."""
        states = paired_states(self.backbone, batch)
        fwd = self.projector.t2vt(states.text)
        bwd = self.projector.vt2t(states.vt_aligned)
        t2vt = gaussian_nll(fwd.mu, fwd.logvar, states.vt_aligned, states.mask)
        vt2t = gaussian_nll(bwd.mu, bwd.logvar, states.text, states.mask)
        with torch.no_grad():
            mse = ((fwd.mu - states.vt_aligned) ** 2).sum(-1)[states.mask].mean()
            gap = ((states.text - states.vt_aligned) ** 2).sum(-1)[states.mask].mean()
        return {"loss": t2vt + vt2t, "t2vt_nll": t2vt, "vt2t_nll": vt2t, "t2vt_mse": mse, "text_vt_gap": gap}

    def training_step(self, batch: PairedBatch, batch_idx: int) -> Tensor:
        """One optimisation step."""
        terms = self.losses(batch)
        bs = batch.text.batch_size
        self.log_dict({f"train/{k}": v for k, v in terms.items() if k != "loss"}, batch_size=bs)
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=bs)
        return terms["loss"]

    def validation_step(self, batch: PairedBatch, batch_idx: int) -> None:
        """Projector NLL on held-out paired data."""
        terms = self.losses(batch)
        self.log("val/projector_nll", terms["loss"], prog_bar=True, sync_dist=True, batch_size=batch.text.batch_size)
        self.log("val/t2vt_mse", terms["t2vt_mse"], sync_dist=True, batch_size=batch.text.batch_size)
