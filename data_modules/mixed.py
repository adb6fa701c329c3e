"""Paired and text-only samples in every batch (stage 1: inverse dynamics and behaviour cloning)."""

from __future__ import annotations

from typing import Any

from data_modules.chat import ChatCodec, PairedItem, TextItem, check_messages
from data_modules.streaming import ShardSource
from data_modules.webdataset_base import StreamingDataModule
from latent_mca.batch import MixedBatch


class MixedDataModule(StreamingDataModule):
    """Stream paired and text-only shards together as :class:`~latent_mca.batch.MixedBatch`.

    Every batch holds ``paired_batch_size`` paired and ``text_batch_size`` text-only samples (the paper:
    4 + 4 per GPU). Setting ``text_train`` to None (or ``text_batch_size`` to 0) switches text-only data off:
    the paired-only warm-up and the "without text-only data" ablation.

    Args:
        processor: Path of the backbone whose processor encodes the samples.
        paired_train: Paired training shards.
        text_train: Text-only training shards (None: no text-only data).
        paired_val: Held-out paired shards (None: no validation).
        text_val: Held-out text-only shards.
        paired_batch_size: Paired samples per batch and rank.
        text_batch_size: Text-only samples per batch and rank.
        max_length: Longest sequence; longer samples are skipped and counted.
        assistant_only: Labels on assistant turns only.
        num_workers: Loader workers per rank.
        shuffle_buffer: Samples in each worker's shuffle buffer (per source).
        seed: Data seed.
    """

    def __init__(self, processor: str, paired_train: str | list[str], text_train: str | list[str] | None = None,
                 paired_val: str | list[str] | None = None, text_val: str | list[str] | None = None,
                 paired_batch_size: int = 4, text_batch_size: int = 4, max_length: int = 1024,
                 assistant_only: bool = True, num_workers: int = 2, shuffle_buffer: int = 1000,
                 seed: int = 0) -> None:
        use_text = text_train is not None and text_batch_size > 0
        train = {"paired": ShardSource(paired_train, paired_batch_size)}
        if use_text:
            train["text_only"] = ShardSource(text_train, text_batch_size)
        val = {}
        if paired_val:
            val["paired"] = ShardSource(paired_val, paired_batch_size)
        if use_text and text_val:
            val["text_only"] = ShardSource(text_val, text_batch_size)
        super().__init__(train=train, val=val or None, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                         seed=seed)
        self.codec = ChatCodec(processor, max_length, assistant_only)

    def check_inputs(self) -> None:
        """Load the processor at setup: a bad ``processor`` path fails here, not in every worker."""
        self.codec.load()

    def decode_item(self, sample: dict[str, Any]) -> PairedItem | TextItem:
        """Decode by source: paired samples get both views, text-only samples one."""
        messages = check_messages(self.sample_json(sample).get("messages"))
        if sample["__source__"] == "paired":
            return self.codec.paired(sample["__key__"], messages, self.sample_image(sample))
        return self.codec.text(sample["__key__"], messages)

    def collate(self, items: list[PairedItem | TextItem]) -> MixedBatch:
        """Split by kind and pad each part."""
        paired = [it for it in items if isinstance(it, PairedItem)]
        text = [it for it in items if isinstance(it, TextItem)]
        return MixedBatch(paired=self.codec.paired_batch(paired) if paired else None,
                          text_only=self.codec.text_batch(text) if text else None)
