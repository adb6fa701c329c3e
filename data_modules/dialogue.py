"""Dialogue prompts with references, for SFT, RL and evaluation."""

from __future__ import annotations

from typing import Any

from data_modules.chat import ChatCodec, DialogueItem
from data_modules.collate import SampleError
from data_modules.streaming import ShardSource
from data_modules.webdataset_base import StreamingDataModule
from latent_mca.batch import DialogueBatch


class DialogueDataModule(StreamingDataModule):
    """Stream dialogue shards (image + ``json`` context, reference, persona, facts) as DialogueBatch.

    Args:
        processor: Path of the backbone whose processor encodes the samples.
        train: Training dialogue shards (e.g. ``world/dialogue/train-*.tar``).
        val: Validation shards (None: none).
        test: Test shards (e.g. ``world/dialogue/test_id-*.tar``).
        batch_size: Prompts per batch and rank.
        with_reference: Also encode prompt + reference with labels (needed by SFT; not by RL).
        max_length: Longest sequence; longer samples are skipped and counted.
        assistant_only: Labels on the reference reply only.
        samples_per_epoch: Training samples per epoch (default: from ``sizes.json``).
        num_workers: Loader workers per rank.
        shuffle_buffer: Samples in each worker's shuffle buffer.
        seed: Data seed.
    """

    def __init__(self, processor: str, train: str | list[str] | None = None, val: str | list[str] | None = None,
                 test: str | list[str] | None = None, batch_size: int = 4, with_reference: bool = True,
                 max_length: int = 1024, assistant_only: bool = True, samples_per_epoch: int | None = None,
                 num_workers: int = 2, shuffle_buffer: int = 1000, seed: int = 0) -> None:
        super().__init__(
            train={"dialogue": ShardSource(train, batch_size, samples_per_epoch)} if train else None,
            val={"dialogue": ShardSource(val, batch_size)} if val else None,
            test={"dialogue": ShardSource(test, batch_size)} if test else None,
            num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed)
        self.codec = ChatCodec(processor, max_length, assistant_only)
        self.with_reference = with_reference

    def check_inputs(self) -> None:
        """Load the processor at setup: a bad ``processor`` path fails here, not in every worker."""
        self.codec.load()

    def decode_item(self, sample: dict[str, Any]) -> DialogueItem:
        """Image (optional) + context + reference -> encoded prompt (and full conversation)."""
        meta = self.sample_json(sample)
        if not isinstance(meta, dict):
            raise SampleError("bad_messages", "the json of a dialogue sample must be an object")
        has_image = any(ext in sample for ext in ("jpg", "jpeg", "png", "webp"))
        image = self.sample_image(sample) if has_image else None
        key = str(meta.get("id") or sample["__key__"])
        return self.codec.dialogue(key, meta, image, self.with_reference)

    def collate(self, items: list[DialogueItem]) -> DialogueBatch:
        """Pad prompts (left) and full conversations (right)."""
        return self.codec.dialogue_batch(items)
