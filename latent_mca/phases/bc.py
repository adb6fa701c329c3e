"""Stage 1c: behaviour cloning of the latent policy into the learned action space.

L_bc = CE(pi(e_{1:t}), argmax f_inverse(e_{1:t+1})), with the inverse model, codebook, world model and
projector frozen. Paired rows use their image-text states, text-only rows the pseudo-multimodal states
``P(e^T).mu`` (or raw text states when the inverse phase ran without the projector).

Launch::

    python -m latent_mca fit --config configs/demo/bc.yaml
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from latent_mca.batch import ChatInputs, MixedBatch
from latent_mca.models import (
    BackboneConfig,
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
from latent_mca.phases.base import PhaseModule
from latent_mca.phases.states import encode, rows, scored_positions, usage_metrics

FROZEN = ("projector", "inverse", "codebook", "world_model")


class BCModule(PhaseModule):
    """Train the policy to predict the frozen inverse model's code from the current observation only.

    Args:
        backbone: The frozen VLM backbone.
        init_from: Export of the inverse-dynamics phase (required).
        policy_layers: Causal transformer blocks of the policy (the paper: 8).
        policy_heads: Attention heads of the policy (None: 64-wide heads).
        optimizer: Optimiser factory.
        lr_scheduler: Optional scheduler factory.
        export_dir: Where the export is written at the end of ``fit``.
    """

    phase = "bc"

    def __init__(self, backbone: BackboneConfig, init_from: str, policy_layers: int = 8,
                 policy_heads: int | None = None, optimizer: OptimizerCallable = torch.optim.AdamW,
                 lr_scheduler: LRSchedulerCallable | None = None, export_dir: str | None = None) -> None:
        super().__init__(backbone, optimizer, lr_scheduler, init_from, export_dir)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.policy: LatentPolicy | None = None
        self.use_projector = True

    def build_modules(self) -> None:
        """Load the frozen stage-1 modules and create the policy."""
        parent = self.parent
        missing = [name for name in FROZEN if not parent.has(name)]
        if missing:
            raise ValueError(f"init_from={self.init_from!r} lacks {missing}: point it at an inverse-dynamics export")
        self.projector = parent.build("projector", ProjectorConfig, CrossModalProjector)
        self.inverse = parent.build("inverse", InverseDynamicsConfig, InverseDynamics)
        self.codebook = parent.build("codebook", CodebookConfig, Codebook)
        self.world_model = parent.build("world_model", WorldModelConfig, WorldModel)
        for name in FROZEN:
            getattr(self, name).requires_grad_(False).eval()
        self.use_projector = bool(parent.extra.get("use_projector", True))
        num_codes = self.codebook.num_codes
        if parent.has("policy"):
            self.policy = parent.build("policy", LatentPolicyConfig, LatentPolicy)
        else:
            hp = self.hparams
            self.policy = LatentPolicy(LatentPolicyConfig(self.backbone.hidden_size, num_layers=hp.policy_layers,
                                                          num_heads=hp.policy_heads, num_codes=num_codes))

    def train(self, mode: bool = True) -> BCModule:
        """Keep the frozen modules in eval mode."""
        super().train(mode)
        for name in FROZEN:
            module = getattr(self, name, None)
            if module is not None:
                module.eval()
        return self

    def export_modules(self) -> dict[str, tuple[nn.Module, Any]]:
        """Every latent module, the trained policy included."""
        return {name: (getattr(self, name), getattr(self, name).config) for name in (*FROZEN, "policy")}

    def export(self, out_dir: Any) -> None:
        """Write the export, keeping the inverse phase's ``use_projector`` for later readers."""
        from latent_mca.checkpoint import save_phase

        save_phase(out_dir, self.phase, self.export_modules(), self.backbone, metrics=self.export_metrics(),
                   parent=self.parent, extra={"use_projector": self.use_projector})

    def _view(self, states: Tensor, inputs: ChatInputs) -> dict[str, Tensor]:
        with torch.no_grad():
            inv = self.inverse(states, inputs.attention_mask)
            select, next_tokens = scored_positions(inputs, inv.valid)
            target = inv.logits.argmax(-1)[select]  # (M,) the code the inverse model would choose
        logits = self.policy(states, inputs.attention_mask)[select]  # (M, K)
        loss = F.cross_entropy(logits.float(), target) if target.numel() else logits.sum() * 0.0
        with torch.no_grad():
            chosen = logits.argmax(-1)
            # Does the world model, driven by the policy's own code, still emit the data's next token?
            wm = self.backbone.lm_head(self.world_model(states[select], self.codebook.embed(chosen)))
        return {"loss": loss, "acc": (chosen == target).float().mean(),
                "policy_wm_acc": (wm.argmax(-1) == next_tokens).float().mean(), "codes": chosen}

    def losses(self, batch: MixedBatch) -> dict[str, Tensor]:
        """BC loss and accuracies for the paired and text-only parts."""
        terms: dict[str, Tensor] = {}
        losses, codes = [], []
        if batch.paired is not None:
            vt = batch.paired.vt
            out = self._view(encode(self.backbone, vt), vt)
            terms.update(mm_bc=out["loss"], mm_bc_acc=out["acc"], mm_policy_wm_acc=out["policy_wm_acc"])
            losses.append(out["loss"])
            codes.append(out["codes"])
        if batch.text_only is not None:
            text = batch.text_only.text
            e_t = encode(self.backbone, text)
            with torch.no_grad():
                states = self.projector.t2vt(e_t).mu if self.use_projector else e_t
            out = self._view(states, text)
            terms.update(text_bc=out["loss"], text_bc_acc=out["acc"], text_policy_wm_acc=out["policy_wm_acc"])
            losses.append(out["loss"])
            codes.append(out["codes"])
        terms["loss"] = torch.stack(losses).sum()
        terms.update(usage_metrics(torch.cat(codes), self.codebook.num_codes))
        return terms

    def training_step(self, batch: MixedBatch, batch_idx: int) -> Tensor:
        """One optimisation step."""
        terms = self.losses(batch)
        bs = rows(batch)
        self.log_dict({f"train/{k}": v for k, v in terms.items() if k != "loss"}, batch_size=bs)
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=bs)
        return terms["loss"]

    def validation_step(self, batch: MixedBatch, batch_idx: int) -> None:
        """BC accuracy on held-out data."""
        terms = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=rows(batch))
