"""Stage 1b: learn the latent action space by inverse dynamics, with text-only data through the projector.

Loss on a mixed batch (paired rows ``MM``, text-only rows ``T``)::

    L = L_inverse(MM, e^{VT}) + L_inverse(T, P(e^T).mu)                     # world-model reconstruction
      + proj_weight  * [NLL(P(e^T); e^{VT}) + NLL(P'(e^{VT}); e^T)]        # on MM
      + cycle_weight * NLL(P'(P(e^T).mu); e^T)                              # on T (cycle consistency)
      + entropy_weight * mean_t sum_k p log p  -  usage_weight * H(mean_t p)

with straight-through Gumbel codes (tau = 2.0). The paper's ablations are configuration switches:
``use_projector: false`` (text-only states enter raw), ``cycle_weight: 0`` (no cycle consistency) and a data
module without text-only rows (no text-only data, also the paired-only warm-up).

Launch::

    python -m latent_mca fit --config configs/demo/inverse_dynamics.yaml
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from latent_mca.batch import MixedBatch
from latent_mca.models import (
    BackboneConfig,
    Codebook,
    CodebookConfig,
    CrossModalProjector,
    InverseDynamics,
    InverseDynamicsConfig,
    ProjectorConfig,
    WorldModel,
    WorldModelConfig,
    gaussian_nll,
)
from latent_mca.phases.base import PhaseModule
from latent_mca.phases.states import encode, inverse_world_loss, paired_states, rows, usage_metrics


class InverseDynamicsModule(PhaseModule):
    """Joint training of inverse dynamics, codebook, world model and projectors.

    Args:
        backbone: The frozen VLM backbone.
        num_codes: Codebook size K (the paper: 128).
        inverse_layers: Causal transformer blocks of the inverse model (the paper: 4).
        inverse_heads: Attention heads of the inverse model (None: 64-wide heads).
        merge_blocks: Gated merge blocks of the world model (the paper: 2).
        merge_width: Hidden width of each merge block (None: about 8/3 of ``2d``).
        tau: Gumbel-softmax temperature (the paper: 2.0).
        use_projector: Feed text-only states through P (False: raw text states; the "w/o projector" ablation).
        train_projector: Keep training the projectors in this phase (the paper: yes).
        proj_weight: Weight of the paired NLL terms (the paper's 1e-5 on its NLL is 2e-5 on ours).
        cycle_weight: Weight of the cycle-consistency NLL on text-only data (0: the "w/o cycle" ablation).
        entropy_weight: Weight of ``mean_t sum_k p log p`` (positive: maximise per-token entropy; paper 1e-3).
        usage_weight: Weight of the batch-level code-usage entropy bonus (0: off).
        histogram_every: Log a code-usage histogram to TensorBoard every N steps (0: never).
        optimizer: Optimiser factory.
        lr_scheduler: Optional scheduler factory.
        init_from: Export of the projector phase (or any export holding a projector and/or latent modules).
        export_dir: Where the export is written at the end of ``fit``.
    """

    phase = "inverse_dynamics"

    def __init__(self, backbone: BackboneConfig, num_codes: int = 128, inverse_layers: int = 4,
                 inverse_heads: int | None = None, merge_blocks: int = 2, merge_width: int | None = None,
                 tau: float = 2.0, use_projector: bool = True, train_projector: bool = True,
                 proj_weight: float = 2e-5, cycle_weight: float = 2e-5, entropy_weight: float = 1e-3,
                 usage_weight: float = 0.0, histogram_every: int = 100,
                 optimizer: OptimizerCallable = torch.optim.AdamW, lr_scheduler: LRSchedulerCallable | None = None,
                 init_from: str | None = None, export_dir: str | None = None) -> None:
        super().__init__(backbone, optimizer, lr_scheduler, init_from, export_dir)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.projector: CrossModalProjector | None = None
        self.inverse: InverseDynamics | None = None
        self.codebook: Codebook | None = None
        self.world_model: WorldModel | None = None

    def build_modules(self) -> None:
        """Create the latent modules; continue from ``init_from`` where it holds them."""
        hp, d, parent = self.hparams, self.backbone.hidden_size, self.parent

        def load_or_new(name: str, config_cls: type, module_cls: type, config: Any) -> nn.Module:
            return parent.build(name, config_cls, module_cls) if parent is not None and parent.has(name) \
                else module_cls(config)

        if parent is not None:
            parent.check_codes(hp.num_codes)
        self.projector = load_or_new("projector", ProjectorConfig, CrossModalProjector, ProjectorConfig(d))
        self.inverse = load_or_new("inverse", InverseDynamicsConfig, InverseDynamics, InverseDynamicsConfig(
            d, num_layers=hp.inverse_layers, num_heads=hp.inverse_heads, num_codes=hp.num_codes))
        self.codebook = load_or_new("codebook", CodebookConfig, Codebook, CodebookConfig(d, num_codes=hp.num_codes))
        self.world_model = load_or_new("world_model", WorldModelConfig, WorldModel, WorldModelConfig(
            d, num_blocks=hp.merge_blocks, intermediate_size=hp.merge_width))
        self.projector.requires_grad_(hp.train_projector and hp.use_projector)

    def export_modules(self) -> dict[str, tuple[nn.Module, Any]]:
        """Projector, inverse model, codebook and world model."""
        return {name: (module, module.config) for name, module in (
            ("projector", self.projector), ("inverse", self.inverse), ("codebook", self.codebook),
            ("world_model", self.world_model))}

    def export(self, out_dir: Any) -> None:
        """Record ``use_projector`` so behaviour cloning builds text-only states the same way."""
        from latent_mca.checkpoint import save_phase

        save_phase(out_dir, self.phase, self.export_modules(), self.backbone, metrics=self.export_metrics(),
                   parent=self.parent, extra={"use_projector": bool(self.hparams.use_projector)})

    # ------------------------------------------------------------------ losses
    def _world(self, states: Tensor, inputs: Any) -> Any:
        return inverse_world_loss(states, inputs, self.inverse, self.codebook, self.world_model,
                                  self.backbone.lm_head, self.hparams.tau)

    def losses(self, batch: MixedBatch) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Every loss term of a mixed batch, and the sampled codes (for usage statistics)."""
        hp = self.hparams
        terms: dict[str, Tensor] = {}
        total = torch.zeros((), device=self.device)
        codes: list[Tensor] = []
        entropy = []
        if batch.paired is not None:
            states = paired_states(self.backbone, batch.paired)
            out = self._world(states.vt, batch.paired.vt)
            total = total + out.loss
            terms.update(mm_inverse=out.loss, mm_wm_acc=out.accuracy, mm_base_acc=out.base_accuracy)
            codes.append(out.codes)
            entropy.append(out.entropy)
            if hp.use_projector and hp.proj_weight > 0:
                fwd, bwd = self.projector.t2vt(states.text), self.projector.vt2t(states.vt_aligned)
                nll = gaussian_nll(fwd.mu, fwd.logvar, states.vt_aligned, states.mask) + gaussian_nll(
                    bwd.mu, bwd.logvar, states.text, states.mask)
                total = total + hp.proj_weight * nll
                terms["mm_proj_nll"] = nll
        if batch.text_only is not None:
            text = batch.text_only.text
            e_t = encode(self.backbone, text)
            pseudo = self.projector.t2vt(e_t).mu if hp.use_projector else e_t
            out = self._world(pseudo, text)
            total = total + out.loss
            terms.update(text_inverse=out.loss, text_wm_acc=out.accuracy, text_base_acc=out.base_accuracy)
            codes.append(out.codes)
            entropy.append(out.entropy)
            if hp.use_projector and hp.cycle_weight > 0:
                back = self.projector.vt2t(pseudo)
                cycle = gaussian_nll(back.mu, back.logvar, e_t, text.attention_mask.bool())
                total = total + hp.cycle_weight * cycle
                terms["text_cycle_nll"] = cycle
        if entropy:
            neg_ent = torch.stack([e["token_neg_entropy"] for e in entropy]).mean()
            usage = torch.stack([e["batch_usage_entropy"] for e in entropy]).mean()
            total = total + hp.entropy_weight * neg_ent - hp.usage_weight * usage
            terms.update(token_neg_entropy=neg_ent, batch_usage_entropy=usage)
        terms["loss"] = total
        return terms, codes

    def training_step(self, batch: MixedBatch, batch_idx: int) -> Tensor:
        """One optimisation step."""
        terms, codes = self.losses(batch)
        all_codes = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.long, device=self.device)
        terms.update(usage_metrics(all_codes, self.hparams.num_codes))
        bs = rows(batch)
        self.log_dict({f"train/{k}": v for k, v in terms.items() if k != "loss"}, batch_size=bs)
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=bs)
        self._maybe_histogram(all_codes)
        return terms["loss"]

    def validation_step(self, batch: MixedBatch, batch_idx: int) -> None:
        """World-model accuracy, its gain over the base model, and the projector NLL on held-out data."""
        terms, codes = self.losses(batch)
        for view in ("mm", "text"):
            if f"{view}_wm_acc" in terms:
                terms[f"{view}_wm_gain"] = terms[f"{view}_wm_acc"] - terms[f"{view}_base_acc"]
        if codes:
            terms.update(usage_metrics(torch.cat(codes), self.hparams.num_codes))
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=rows(batch))

    def _maybe_histogram(self, codes: Tensor) -> None:
        every = self.hparams.histogram_every
        if not every or self.global_step % every or codes.numel() == 0:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("train/code_usage", codes.detach().cpu(), self.global_step,
                                                bins=self.hparams.num_codes)
