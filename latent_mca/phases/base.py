"""Plumbing shared by every phase: backbone construction, optimiser injection, checkpoints, export.

:class:`PhaseModule` is a template, not a phase: each phase (``ProjectorModule``, ``InverseDynamicsModule``,
``BCModule``, ``LatentRLModule``, ``SFTModule``, ``TokenRLModule``) subclasses it directly and fills in
``build_modules``, ``training_step``, ``export_modules`` and optionally ``validation_step``. No phase
subclasses another phase.

The backbone and the latent modules are built in ``configure_model`` so that DeepSpeed ZeRO-3 can shard
them as they are created. A frozen backbone is referenced, never stored: it is dropped from Lightning
checkpoints and exports record only its path and fingerprint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from latent_mca.checkpoint import PhaseExport, load_phase, mark_complete, save_phase
from latent_mca.models.backbone import Backbone, BackboneConfig

BACKBONE_PREFIX = "backbone."
BATCHES_KEY = "latent_mca_train_batches_seen"


class PhaseModule(L.LightningModule):
    """Template for one training phase.

    Args:
        backbone: How to load the VLM backbone.
        optimizer: Optimiser factory (``class_path`` + ``init_args`` in YAML), called with the trainable
            parameters.
        lr_scheduler: Optional scheduler factory, stepped every optimiser step.
        init_from: Export directory of the previous phase to start from.
        export_dir: Where to write this phase's export at the end of ``fit`` (default:
            ``<log_dir>/export``).
    """

    phase: ClassVar[str] = "phase"

    def __init__(self, backbone: BackboneConfig, optimizer: OptimizerCallable = torch.optim.AdamW,
                 lr_scheduler: LRSchedulerCallable | None = None, init_from: str | None = None,
                 export_dir: str | None = None) -> None:
        super().__init__()
        self.backbone_config = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.init_from = init_from
        self.export_dir = export_dir
        self.backbone: Backbone | None = None
        self.parent: PhaseExport | None = None
        # Frozen backbone weights are not in checkpoints; on_load_checkpoint checks the rest strictly.
        self.strict_loading = False
        # Training batches drawn so far (checkpointed): the data position on resume. It differs from
        # global_step when an RL phase takes several optimiser steps per batch (num_iterations) or samples
        # several batches per step (DAPO dynamic sampling).
        self.train_batches_seen = 0

    # ------------------------------------------------------------------ construction
    def configure_model(self) -> None:
        """Load the backbone and build this phase's modules (idempotent)."""
        if self.backbone is not None:
            return
        self.backbone = Backbone.from_pretrained(self.backbone_config)
        if self.init_from:
            self.parent = load_phase(self.init_from)
            self.parent.check_backbone(self.backbone)
        self.build_modules()

    def build_modules(self) -> None:
        """Create (and load from ``self.parent``) the phase's latent modules."""
        raise NotImplementedError

    def export_modules(self) -> dict[str, tuple[nn.Module, Any]]:
        """Modules to export: name -> (module, config dataclass)."""
        raise NotImplementedError

    def export_metrics(self) -> dict[str, float]:
        """Final metrics written into the export (default: the trainer's logged metrics)."""
        out = {}
        for key, value in self.trainer.callback_metrics.items():
            if torch.is_tensor(value) and value.numel() == 1:
                out[key] = float(value)
        return out

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        """Optimise the parameters that require gradients."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Count the batch before any checkpoint of this step is written."""
        self.train_batches_seen += 1

    # ------------------------------------------------------------------ checkpoints and export
    @property
    def backbone_frozen(self) -> bool:
        """Whether the backbone's weights stay fixed in this phase."""
        return self.backbone_config.trainable == "none"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop a frozen backbone from the checkpoint (it is referenced by path); record the data position."""
        checkpoint[BATCHES_KEY] = self.train_batches_seen
        if self.backbone_frozen:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(BACKBONE_PREFIX)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint holds every non-backbone weight of this module; restore the data position.

        Checkpoints written before the batch counter existed count one batch per optimiser step.
        """
        accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        self.train_batches_seen = int(checkpoint.get(BATCHES_KEY, checkpoint.get("global_step", 0) * accumulate))
        # Checkpoints of an older layout (separate q/k/v, gate/up, fc1/fc2 matrices) are converted by the
        # modules' load hooks; convert the keys here too so that the check below sees the current names.
        state = checkpoint["state_dict"]
        for name, module in self.named_modules():
            upgrade = getattr(module, "upgrade_legacy_keys", None)
            if callable(upgrade):
                upgrade(state, f"{name}." if name else "")
        expected = {k for k in self.state_dict() if not (self.backbone_frozen and k.startswith(BACKBONE_PREFIX))}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(f"checkpoint is missing weights of {type(self).__name__}: {missing[:8]}")

    def resolved_export_dir(self) -> Path:
        """The export directory (``export_dir`` or ``<log_dir>/export``)."""
        if self.export_dir:
            return Path(self.export_dir)
        log_dir = self.trainer.log_dir if self.trainer is not None else None
        return Path(log_dir or ".") / "export"

    def export_targets(self) -> list[nn.Module]:
        """Modules whose full parameters :meth:`export` reads (gathered first under ZeRO-3)."""
        return [module for module, _ in self.export_modules().values()]

    def export(self, out_dir: Path) -> None:
        """Write this phase's export on rank 0 with full parameters (backbone-training phases override it)."""
        save_phase(out_dir, self.phase, self.export_modules(), self.backbone, metrics=self.export_metrics(),
                   parent=self.parent, extra=dict(self.parent.extra) if self.parent is not None else None)

    def on_fit_end(self) -> None:
        """Write this phase's export (rank 0; ZeRO-3 parameters gathered on every rank first)."""
        from latent_mca.distributed import gathered

        with gathered(self.export_targets()):
            if self.trainer.is_global_zero:
                out = self.resolved_export_dir()
                self.export(out)
                mark_complete(out, self.phase, self.global_step, self.export_metrics())
        self.trainer.strategy.barrier("phase_export")
