"""Fault injection for the reliability tests: callbacks that crash a run or record it, and shard damage.

The callbacks are importable by ``class_path``, so a test adds them to a real ``fit`` from the command line::

    --trainer.callbacks+=tests.helpers.reliability_run.CrashAfterStep --trainer.callbacks.init_args.step=3
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from latent_mca.models.tiny import TinyBackboneSpec
from latent_mca.world import WorldSpec

#: The smallest world whose shard names the demo configs resolve (paired train 0-6, validation 7).
WORLD = WorldSpec(num_paired=32, num_text_only=32, num_dialogue_train=16, num_test_id=4, num_test_ood=4,
                  samples_per_shard=4, image_size=56, num_characters=4)
#: A tiny backbone matching :data:`WORLD`'s 56-pixel images.
BACKBONE = TinyBackboneSpec(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=1, vision_depth=1, vision_hidden_size=32, image_size=56)


class SimulatedCrash(RuntimeError):
    """What :class:`CrashAfterStep` raises: stands for a killed process (no export, no clean shutdown)."""


class CrashAfterStep(Callback):
    """Raise :class:`SimulatedCrash` when the batch after optimiser step ``step`` starts.

    Lightning runs ``ModelCheckpoint`` after every other callback, so the checkpoint of step ``step`` is on
    disk when this fires; the run dies mid-epoch without reaching ``on_fit_end`` (no export).

    Args:
        step: The last optimiser step that completes.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Crash once ``step`` optimiser steps are done."""
        if trainer.global_step >= self.step:
            raise SimulatedCrash(f"simulated crash after step {trainer.global_step}")


class RecordBatchKeys(Callback):
    """Write the sample keys of every training batch this rank consumed to ``<out>/keys_rank<r>.json``.

    The file is rewritten at every batch, so it also describes a run that crashed.

    Args:
        out: Directory of the JSON files (one per rank).
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.keys: list[list[str]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Remember the batch's keys."""
        self.keys.append(batch_keys(batch))
        self._write(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record the final optimiser step count."""
        self._write(trainer)

    def _write(self, trainer: Trainer) -> None:
        path = Path(self.out) / f"keys_rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rank": trainer.global_rank, "world_size": trainer.world_size,
                                    "global_step": trainer.global_step, "batches": self.keys}))


def batch_keys(batch: Any) -> list[str]:
    """The sample keys of a typed batch; a mixed batch's keys are prefixed by their part (``paired/...``)."""
    keys = getattr(batch, "keys", None)
    if isinstance(keys, list):
        return [str(k) for k in keys]
    return [f"{part}/{k}" for part in ("paired", "text_only")
            for k in (getattr(getattr(batch, part, None), "keys", None) or [])]


def truncate_shard(path: Path) -> int:
    """Cut a tar shard in the middle of the data of its middle file (a partial download or a full disk).

    Cutting at a fraction of the file size is not enough: tar pads archives to 10 KiB records, so a small
    shard can lose half its bytes and none of its contents. Returns the new size.
    """
    with tarfile.open(path) as tar:
        files = [m for m in tar.getmembers() if m.isfile()]
    middle = files[len(files) // 2]
    size = middle.offset_data + middle.size // 2
    path.write_bytes(path.read_bytes()[:size])
    return size


def shard_members(path: Path) -> dict[str, bytes]:
    """File name -> content of every file in a tar shard, in archive order."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def replace_members(path: Path, replacements: dict[str, bytes]) -> None:
    """Rewrite a tar shard with some files' contents replaced (names must exist; order is kept)."""
    members = shard_members(path)
    unknown = set(replacements) - set(members)
    if unknown:
        raise KeyError(f"{path} has no {sorted(unknown)}")
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            data = replacements.get(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def edit_json(path: Path, name: str, edit: Any) -> dict[str, Any]:
    """Apply ``edit(doc) -> doc`` to the JSON file ``name`` of a shard; returns the new document."""
    doc = edit(json.loads(shard_members(path)[name]))
    replace_members(path, {name: json.dumps(doc).encode()})
    return doc


def module_weights(export_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """The weights of one module of a phase export (``<name>.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(Path(export_dir) / f"{name}.safetensors"))
