"""A phase-shaped toy module and a pre-batched data module for strategy, checkpoint and guard tests.

``ToyPhase`` mimics :class:`latent_mca.phases.base.PhaseModule` where it matters for scale-out: modules are
built in ``configure_model`` (so ZeRO-3 shards them), a frozen part is rebuilt from a fixed seed (like a
backbone loaded by path) and dropped from checkpoints, the optimiser comes from an ``OptimizerCallable``.
It can poison its loss or gradients on chosen steps. ``ToyBatches`` yields ready-made batches through
``DataLoader(batch_size=None)`` with the same number of batches on every rank, like our streaming modules.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from latent_mca.distributed import gathered

FROZEN_PREFIX = "frozen."


class ToyPhase(L.LightningModule):
    """A frozen feature layer and a trainable head on a regression task.

    Args:
        hidden: Width.
        optimizer: Optimiser factory.
        nan_loss_steps: Global steps whose loss is multiplied by NaN.
        nan_grad_steps: Global steps whose first head weight gradient is set to NaN after backward.
        inf_loss_steps: Global steps whose loss is multiplied by inf.
        nan_loss_batches: Batch indices (within the epoch) whose loss is multiplied by NaN.
        loss_rank: Only this rank poisons its loss (``None``: every rank).
        grad_rank: Only this rank poisons its gradient (``None``: every rank).
    """

    def __init__(self, hidden: int = 8, optimizer: OptimizerCallable = torch.optim.AdamW,
                 nan_loss_steps: list[int] | None = None, nan_grad_steps: list[int] | None = None,
                 inf_loss_steps: list[int] | None = None, nan_loss_batches: list[int] | None = None,
                 loss_rank: int | None = None,
                 grad_rank: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.frozen: nn.Module | None = None
        self.head: nn.Module | None = None
        self.strict_loading = False  # the frozen part is not in checkpoints

    def configure_model(self) -> None:
        if self.head is not None:
            return
        hidden = self.hparams.hidden
        # A fixed "pretrained" layer, identical in every process and run. Seeded construction rather than
        # a copy afterwards: under ZeRO-3 (deepspeed.zero.Init) parameters are partitioned once created.
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            self.frozen = nn.Linear(hidden, hidden)
        self.frozen.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def _poisoned(self, steps: list[int] | None, rank: int | None) -> bool:
        return bool(steps) and self.global_step in steps and rank in (None, self.global_rank)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.frozen(x)).squeeze(-1), y)
        if self._poisoned(self.hparams.nan_loss_steps, self.hparams.loss_rank):
            loss = loss * float("nan")
        if self._poisoned(self.hparams.inf_loss_steps, self.hparams.loss_rank):
            loss = loss * float("inf")
        if batch_idx in (self.hparams.nan_loss_batches or []):
            loss = loss * float("nan")
        self.log("train/loss", loss, batch_size=x.shape[0])
        return loss

    def on_after_backward(self) -> None:
        if self._poisoned(self.hparams.nan_grad_steps, self.hparams.grad_rank):
            grad = self.head[0].weight.grad
            grad[0, 0] = float("nan")

    def configure_optimizers(self):
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])

    def on_save_checkpoint(self, checkpoint) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(FROZEN_PREFIX)]:
            del state[key]


class _Batches(IterableDataset):
    def __init__(self, hidden: int, batch_size: int, num_batches: int, rank: int) -> None:
        self.hidden, self.batch_size, self.num_batches, self.rank = hidden, batch_size, num_batches, rank

    def __iter__(self):
        g = torch.Generator().manual_seed(100 + self.rank)
        for _ in range(self.num_batches):
            x = torch.randn(self.batch_size, self.hidden, generator=g)  # (B, hidden)
            yield x, x.sin().sum(-1)


class ToyBatches(L.LightningDataModule):
    """Ready-made batches (``DataLoader(batch_size=None)``), different on each rank, equal in number.

    Args:
        hidden: Input width.
        batch_size: Rows per batch.
        num_batches: Batches per rank per epoch.
    """

    def __init__(self, hidden: int = 8, batch_size: int = 4, num_batches: int = 16) -> None:
        super().__init__()
        self.hidden, self.batch_size, self.num_batches = hidden, batch_size, num_batches

    def train_dataloader(self):
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return DataLoader(_Batches(self.hidden, self.batch_size, self.num_batches, rank), batch_size=None)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the full trainable parameters (gathered first when ZeRO-3 partitioned them; collective)."""
    with gathered([module]):
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class UpdateRecorder(Callback):
    """Records, per global step, whether the training batch changed any trainable parameter."""

    def __init__(self) -> None:
        self.changed: dict[int, bool] = {}
        self.per_batch: list[bool] = []  # the same, per training batch (manual skips repeat a step index)
        self.first: dict[str, torch.Tensor] | None = None  # the weights the first batch started from
        self._before: dict[str, torch.Tensor] = {}
        self._step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step
        self._before = trainable_state(pl_module)
        if self.first is None:
            self.first = self._before

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = trainable_state(pl_module)
        self.changed[self._step] = any(not torch.equal(after[n], v) for n, v in self._before.items())
        self.per_batch.append(self.changed[self._step])
