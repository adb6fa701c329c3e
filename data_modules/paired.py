"""Paired image-text conversations (with their text views) for the projector phase."""

from __future__ import annotations

from typing import Any

from data_modules.chat import ChatCodec, PairedItem, check_messages
from data_modules.streaming import ShardSource
from data_modules.webdataset_base import StreamingDataModule
from latent_mca.batch import PairedBatch


class PairedImageTextDataModule(StreamingDataModule):
    """Stream paired shards (image + ``json`` messages) as :class:`~latent_mca.batch.PairedBatch`.

    Args:
        processor: Path of the backbone whose processor encodes the samples.
        train: Training shards (directory with ``sizes.json``, brace pattern, glob, URL or a list).
        val: Held-out shards for validation (None: no validation).
        batch_size: Samples per batch and rank.
        max_length: Longest sequence; longer samples are skipped and counted.
        assistant_only: Labels on assistant turns only.
        samples_per_epoch: Samples per epoch (default: from ``sizes.json``).
        num_workers: Loader workers per rank.
        shuffle_buffer: Samples in each worker's shuffle buffer.
        seed: Data seed (shard permutations and shuffle buffers).
    """

    def __init__(self, processor: str, train: str | list[str], val: str | list[str] | None = None,
                 batch_size: int = 8, max_length: int = 1024, assistant_only: bool = True,
                 samples_per_epoch: int | None = None, num_workers: int = 2, shuffle_buffer: int = 1000,
                 seed: int = 0) -> None:
        super().__init__(
            train={"paired": ShardSource(train, batch_size, samples_per_epoch)},
            val={"paired": ShardSource(val, batch_size)} if val else None,
            num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed)
        self.codec = ChatCodec(processor, max_length, assistant_only)

    def check_inputs(self) -> None:
        """Load the processor at setup: a bad ``processor`` path fails here, not in every worker."""
        self.codec.load()

    def decode_item(self, sample: dict[str, Any]) -> PairedItem:
        """Image + messages -> both encoded views."""
        meta = self.sample_json(sample)
        return self.codec.paired(sample["__key__"], check_messages(meta.get("messages")), self.sample_image(sample))

    def collate(self, items: list[PairedItem]) -> PairedBatch:
        """Pad into a paired batch."""
        return self.codec.paired_batch(items)
