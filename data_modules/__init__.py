"""LightningDataModules that stream webdataset shards into :mod:`latent_mca.batch` batches.

The streaming base class is re-exported lazily, so that importing a light submodule (``data_modules.collate``)
does not import Lightning.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "StreamingDataModule": "data_modules.webdataset_base",
    "StreamingLoader": "data_modules.webdataset_base",
    "SkipCountLogger": "data_modules.webdataset_base",
    "SkipLedger": "data_modules.webdataset_base",
    "ShardSource": "data_modules.streaming",
    "SlotDataset": "data_modules.streaming",
    "SampleError": "data_modules.collate",
    "ChatEncoder": "data_modules.collate",
    "PairedImageTextDataModule": "data_modules.paired",
    "TextOnlyDataModule": "data_modules.text_only",
    "MixedDataModule": "data_modules.mixed",
    "DialogueDataModule": "data_modules.dialogue",
    "TokenBlockDataModule": "data_modules.token_blocks",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_modules' has no attribute {name!r}")
