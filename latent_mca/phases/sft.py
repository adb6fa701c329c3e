"""Token-level supervised fine-tuning of the backbone: the demo's base VLM and the paper's SFT baseline.

Next-token cross-entropy on every labelled token (assistant turns only by default, set by the data
module) of whatever views the batch holds: dialogue (prompt + reference), paired image-text and
text-only conversations. Which backbone parameters train is ``backbone.trainable``: ``all``,
``top_n`` (the last ``backbone.top_n_layers`` layers) or ``lora``.

The export is a complete Hugging Face checkpoint (model + processor) that later phases load as their
``backbone.path``.

Launch::

    python -m latent_mca fit --config configs/demo/sft.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from latent_mca.batch import IGNORE_INDEX, ChatInputs, DialogueBatch, MixedBatch, PairedBatch, TextBatch
from latent_mca.batch import next_token_targets
from latent_mca.models import Backbone, BackboneConfig
from latent_mca.phases.base import PhaseModule


def supervised_views(batch: Any) -> list[ChatInputs]:
    """The labelled views of any batch type of the contract."""
    if isinstance(batch, DialogueBatch):
        if batch.full is None:
            raise ValueError("SFT needs DialogueBatch.full (prompt + reference); enable it in the data module")
        return [batch.full]
    if isinstance(batch, MixedBatch):
        return [v for part in (batch.paired, batch.text_only) if part is not None for v in supervised_views(part)]
    if isinstance(batch, PairedBatch):
        return [batch.vt]
    if isinstance(batch, TextBatch):
        return [batch.text]
    raise TypeError(f"SFTModule cannot train on a {type(batch).__name__}")


def token_loss(backbone: Backbone, inputs: ChatInputs) -> tuple[Tensor, Tensor, int]:
    """Mean next-token cross-entropy over labelled tokens, accuracy, and the token count."""
    hidden = backbone(inputs.input_ids, inputs.attention_mask, inputs.vision)
    targets = next_token_targets(inputs.labels)
    select = targets != IGNORE_INDEX
    logits = backbone.lm_head(hidden[select])  # (M, V): the head only where there is a target
    y = targets[select]
    if y.numel() == 0:
        return logits.sum() * 0.0, logits.new_zeros(()), 0
    return F.cross_entropy(logits.float(), y), (logits.argmax(-1) == y).float().mean(), int(y.numel())


class SFTModule(PhaseModule):
    """Supervised fine-tuning of the backbone itself.

    Args:
        backbone: The VLM; ``trainable`` must be ``all``, ``top_n`` or ``lora``.
        optimizer: Optimiser factory.
        lr_scheduler: Optional scheduler factory.
        export_dir: Where the fine-tuned checkpoint is saved at the end of ``fit``.
    """

    phase = "sft"

    def __init__(self, backbone: BackboneConfig, optimizer: OptimizerCallable = torch.optim.AdamW,
                 lr_scheduler: LRSchedulerCallable | None = None, export_dir: str | None = None) -> None:
        if backbone.trainable == "none":
            raise ValueError("SFTModule trains the backbone: set backbone.trainable to all, top_n or lora")
        super().__init__(backbone, optimizer, lr_scheduler, None, export_dir)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])

    def build_modules(self) -> None:
        """Nothing beyond the backbone."""

    def export_targets(self) -> list[nn.Module]:
        """The backbone is what this phase exports."""
        return [self.backbone]

    def export(self, out_dir: Path) -> None:
        """Save the fine-tuned backbone (LoRA merged) with its processor."""
        self.backbone.save_pretrained(out_dir)

    def step(self, batch: Any, split: str) -> Tensor:
        """Loss over all labelled views of the batch, logged under ``split``."""
        losses, accs, counts = [], [], []
        for view in supervised_views(batch):
            loss, acc, n = token_loss(self.backbone, view)
            losses.append(loss * n)
            accs.append(acc * n)
            counts.append(n)
        total = max(1, sum(counts))
        loss = torch.stack(losses).sum() / total
        acc = torch.stack(accs).sum() / total
        bs = sum(v.batch_size for v in supervised_views(batch))
        sync = split != "train"
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=sync, batch_size=bs)
        self.log(f"{split}/token_acc", acc, sync_dist=sync, batch_size=bs)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One optimisation step."""
        return self.step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Held-out loss and token accuracy."""
        self.step(batch, "val")
