"""A toy LightningModule / LightningDataModule pair for CLI tests."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class ToyRegression(L.LightningModule):
    """Linear regression.

    Args:
        hidden: Input width.
        lr: Learning rate.
    """

    def __init__(self, hidden: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(hidden, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ToyData(L.LightningDataModule):
    """Random regression data.

    Args:
        hidden: Input width.
        size: Number of samples.
        batch_size: Batch size.
    """

    def __init__(self, hidden: int = 4, size: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(size, hidden, generator=g)
        self.data = TensorDataset(x, x.sum(-1))
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)
