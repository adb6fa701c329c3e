"""The one streaming base class of every data module: webdataset shards in, typed batches out.

A subclass only says how one raw sample becomes an item (:meth:`StreamingDataModule.decode_item`) and how a
list of items becomes a batch (:meth:`StreamingDataModule.collate`). The base class owns the rest:

* shard listing and counting (``sizes.json`` beside the shards) for one or more named sources, each with
  its own share of every batch (e.g. 4 paired + 4 text-only samples);
* explicit rank and world size from the trainer; a per-epoch shard permutation that is identical on every
  rank and applied before the split into (rank, worker) slots; slots cycle their shards, so every rank
  yields the same number of batches (a DDP/ZeRO requirement);
* a seeded sample shuffle per slot, decoding after shuffling and after the resume skip;
* exact mid-epoch resume: the data position is a function of ``trainer.global_step`` (see
  :meth:`StreamingDataModule.consumed_train_batches`); limits: the same world size, ``num_workers``, batch
  sizes, seed and sources as the run that wrote the checkpoint (a mismatch is warned about on resume), and
  no worker's first batch after (re)start lost every sample to decode errors (the worker then reads ahead);
* skipped samples (corrupt image, malformed JSON, truncated or missing shard, ``SampleError``) are counted
  by reason, named (``url#key``), sent to the main process with each batch, exposed as
  :attr:`StreamingDataModule.skip_counts` and logged as ``data/skipped_<reason>`` by
  :class:`SkipCountLogger` (attached automatically).

Validation and test loaders read every sample once across ranks in a fixed order; slots with fewer samples
pad with repeated samples (``sample["__repeat__"]`` is True; phases drop them, or drop duplicate keys).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from data_modules.collate import SampleError
from data_modules.streaming import ResolvedSource, ShardSource, SlotDataset, eval_batches, resolve_source
from latent_mca.shards import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

Position = Callable[[], tuple[int, int]]


def _single_threaded_worker(worker_id: int) -> None:
    """Decode and collate with one intra-op thread per worker: N workers must not each claim every core."""
    torch.set_num_threads(1)


class SkipLedger:
    """Main-process totals of skipped samples, fed by the deltas that travel with every batch.

    Args:
        max_names: Names (``(reason, "url#key")``) remembered at most; counts are always complete.
    """

    def __init__(self, max_names: int = 1000) -> None:
        self.max_names = max_names
        self.counts: Counter[str] = Counter()
        self.names: list[tuple[str, str]] = []

    def add(self, delta: dict[str, Any]) -> None:
        """Add one worker's delta (see :meth:`~data_modules.streaming.SkipStats.drain`)."""
        self.counts.update(delta["counts"])
        room = self.max_names - len(self.names)
        if room > 0:
            self.names.extend(tuple(n) for n in delta["names"][:room])


class StreamingLoader:
    """The iterable Lightning gets as a dataloader: a DataLoader over a :class:`SlotDataset`, per epoch.

    Each ``iter()`` asks ``position()`` where the data stand (data epoch, batches this rank has consumed
    in it), builds (or, with persistent workers, reuses) the DataLoader, unpacks the ``(batch, skips)``
    pairs into the ledger and yields the batches. ``len()`` is the full epoch length on every rank; after a
    mid-epoch resume the first iteration yields only the rest, which matches Lightning's own count.

    Args:
        pipeline: The per-worker pipeline (not called ``dataset``: Lightning would take this for a sized
            IterableDataset and warn).
        batches_per_epoch: Batches per rank per epoch.
        ledger: Where skip counts go.
        position: Returns ``(data_epoch, consumed)``; None: iteration ``k`` is epoch ``k`` from the start.
        loader_kwargs: Extra ``DataLoader`` arguments (num_workers, pin_memory, ...).
    """

    def __init__(self, pipeline: SlotDataset, batches_per_epoch: int, ledger: SkipLedger,
                 position: Position | None = None, loader_kwargs: dict[str, Any] | None = None) -> None:
        self.pipeline = pipeline
        self.batches_per_epoch = batches_per_epoch
        self.ledger = ledger
        self.position = position
        self.loader_kwargs = dict(loader_kwargs or {})
        self._iterations = 0
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        epoch, consumed = self.position() if self.position is not None else (self._iterations, 0)
        self._iterations += 1
        self.pipeline.set_position(epoch, consumed)
        loader = self._loader
        if loader is None:
            loader = DataLoader(self.pipeline, batch_size=None, **self.loader_kwargs)
            if self.loader_kwargs.get("persistent_workers"):
                self._loader = loader
        for batch, skips in loader:
            self.ledger.add(skips)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """What exact resume depends on (saved in checkpoints by Lightning; the position itself is not)."""
        d = self.pipeline
        return {"world_size": d.world_size, "num_workers": d.num_workers, "seed": d.seed,
                "batches_per_epoch": self.batches_per_epoch, "shuffle_buffer": d.shuffle_buffer,
                "sources": {s.name: [s.batch_size, s.samples, len(s.urls)] for s in d.sources}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when the checkpoint was written with settings that make the resumed order differ."""
        changed = {k: (v, state_dict[k]) for k, v in self.state_dict().items() if k in state_dict
                   and json.dumps(v) != json.dumps(state_dict[k])}
        if changed:
            rank_zero_warn(f"Resuming with different data settings (now, in checkpoint): {changed}; the data "
                           "order will not continue exactly where the checkpoint left off.")


class SkipCountLogger(Callback):
    """Log ``data/skipped_<reason>`` (summed over ranks) during training.

    Args:
        sync_every: With several ranks, batches between two all-gathers of the counts (a collective on every
            rank); default ``trainer.log_every_n_steps``. Between gathers the last totals are logged again.
    """

    def __init__(self, sync_every: int | None = None) -> None:
        self.sync_every = sync_every
        self._batches = 0
        self._totals: dict[str, int] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Refresh the totals every ``sync_every`` batches and log them."""
        dm = trainer.datamodule
        if not isinstance(dm, StreamingDataModule):
            return
        every = self.sync_every or trainer.log_every_n_steps or 1
        self._batches += 1
        if trainer.world_size < 2 or self._batches % every == 0:
            self._totals = _sum_over_ranks(dict(dm.skip_counts), trainer.world_size)
        if self._totals:
            pl_module.log_dict({f"data/skipped_{k}": float(v) for k, v in sorted(self._totals.items())},
                               on_step=True, on_epoch=False, batch_size=1)


def _sum_over_ranks(counts: dict[str, int], world_size: int) -> dict[str, int]:
    if world_size < 2 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return counts
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, counts)
    total: Counter[str] = Counter()
    for part in gathered:
        total.update(part)
    return dict(total)


class StreamingDataModule(LightningDataModule):
    """Base of every streaming data module (paired, text-only, mixed, dialogue).

    Subclasses implement :meth:`decode_item` and :meth:`collate` (and usually a friendlier ``__init__`` that
    builds the :class:`ShardSource` mappings). Loaders are built per split with the trainer's rank and world
    size; see the module docstring for the guarantees.

    Args:
        train: Training sources by name (a batch holds ``batch_size`` samples of each, in this order).
        val: Validation sources by name.
        test: Test sources by name.
        num_workers: DataLoader worker processes per rank (0: read in the main process). Exact resume
            needs the same value as the interrupted run.
        shuffle_buffer: Raw samples in each worker's shuffle buffer per source (0 or 1: no sample shuffle;
            shards are still permuted every epoch).
        seed: Seed of the shard permutations and shuffle buffers (independent of ``seed_everything``).
        persistent_workers: Keep worker processes alive between epochs.
        pin_memory: Pin batches in page-locked memory (for GPU training).
        prefetch_factor: Batches each worker prepares ahead (DataLoader's default when None).
        multiprocessing_context: ``"fork"``, ``"spawn"`` or ``"forkserver"`` (platform default when None).
        missing_shards: ``"error"``: a shard that does not exist fails setup; ``"skip"``: it is dropped,
            counted as ``missing_shard`` and warned about, as long as the source keeps some shards.
        error_log_every: Each worker logs its first skipped sample and then every N-th.
        max_skip_names: Names of skipped samples remembered (counts are always complete).
        log_skip_counts: Attach a :class:`SkipCountLogger` to the trainer if it has none.
    """

    def __init__(
        self,
        train: dict[str, ShardSource] | None = None,
        val: dict[str, ShardSource] | None = None,
        test: dict[str, ShardSource] | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
        missing_shards: Literal["error", "skip"] = "error",
        error_log_every: int = 1000,
        max_skip_names: int = 1000,
        log_skip_counts: bool = True,
    ) -> None:
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if missing_shards not in ("error", "skip"):
            raise ValueError(f"missing_shards must be 'error' or 'skip', got {missing_shards!r}")
        self.sources = {"train": dict(train or {}), "val": dict(val or {}), "test": dict(test or {})}
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.persistent_workers, self.pin_memory = persistent_workers, pin_memory
        self.prefetch_factor, self.multiprocessing_context = prefetch_factor, multiprocessing_context
        self.missing_shards, self.error_log_every = missing_shards, error_log_every
        self.log_skip_counts = log_skip_counts
        self._ledger = SkipLedger(max_skip_names)
        self._resolved: dict[str, list[ResolvedSource]] = {}

    # ----------------------------------------------------------------- subclass hooks
    def decode_item(self, sample: dict[str, Any]) -> Any:
        """Turn one raw sample into an item; runs in the worker, after shuffling and the resume skip.

        Args:
            sample: ``__key__``, ``__url__``, ``__source__`` (source name), ``__split__`` (``train``/``val``/
                ``test``), ``__repeat__`` (eval padding) and one ``bytes`` value per file extension.

        Raises:
            SampleError: To skip the sample, with a reason (counted as ``data/skipped_<reason>``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement decode_item")

    def collate(self, items: list[Any]) -> Any:
        """Turn the items of one batch (sources in configuration order) into the batch the phase consumes."""
        raise NotImplementedError(f"{type(self).__name__} must implement collate")

    # ----------------------------------------------------------------- helpers for decode_item
    @staticmethod
    def sample_json(sample: dict[str, Any], ext: str = "json") -> dict[str, Any]:
        """The sample's JSON document.

        Raises:
            SampleError: ``missing_json`` or ``bad_json``.
        """
        if ext not in sample:
            raise SampleError("missing_json", f"no .{ext} file")
        try:
            return json.loads(sample[ext])
        except (ValueError, UnicodeDecodeError) as exc:
            raise SampleError("bad_json", f".{ext} is not valid JSON: {exc}") from exc

    @staticmethod
    def sample_image(sample: dict[str, Any], exts: tuple[str, ...] = IMAGE_EXTENSIONS) -> Any:
        """The sample's image as an RGB PIL image (the first of ``exts`` present), fully decoded.

        Raises:
            SampleError: ``missing_image`` or ``bad_image``.
        """
        from PIL import Image

        ext = next((e for e in exts if e in sample), None)
        if ext is None:
            raise SampleError("missing_image", f"none of {exts} present")
        try:
            with Image.open(io.BytesIO(sample[ext])) as img:
                return img.convert("RGB")  # convert() loads every pixel, so truncation surfaces here
        except (OSError, ValueError, SyntaxError) as exc:
            raise SampleError("bad_image", f".{ext} does not decode: {exc}") from exc

    # ----------------------------------------------------------------- Lightning hooks
    def check_inputs(self) -> None:
        """Validate anything besides shards a subclass needs (e.g. load its processor) so it fails at setup."""

    def setup(self, stage: str) -> None:
        """List and count the shards of the splits ``stage`` needs; attach the skip logger."""
        self.check_inputs()
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
        for split in splits:
            self.resolve(split)
        if stage == "fit" and not self.sources["train"]:
            raise ValueError(f"{type(self).__name__}: fitting needs at least one train source")
        trainer = self.trainer
        if self.log_skip_counts and trainer is not None and not any(
                isinstance(cb, SkipCountLogger) for cb in trainer.callbacks):
            trainer.callbacks.append(SkipCountLogger())

    def train_dataloader(self) -> StreamingLoader:
        """The training loader of this rank; its position follows ``trainer.global_step``."""
        trainer = self.trainer
        loader = self.make_loader("train", trainer.global_rank, trainer.world_size,
                                  accumulate_grad_batches=trainer.accumulate_grad_batches)
        loader.position = lambda: divmod(self.consumed_train_batches(), loader.batches_per_epoch)
        return loader

    def val_dataloader(self) -> StreamingLoader | list:
        """The validation loader of this rank (an empty list when no val sources are configured)."""
        return self._eval_loader("val")

    def test_dataloader(self) -> StreamingLoader | list:
        """The test loader of this rank (an empty list when no test sources are configured)."""
        return self._eval_loader("test")

    def teardown(self, stage: str) -> None:
        """Report what was skipped (rank-local), so that nothing is lost silently."""
        if self._ledger.counts:
            log.warning("%s skipped %s; first: %s", type(self).__name__, dict(self._ledger.counts),
                        self._ledger.names[:5])

    # ----------------------------------------------------------------- public API
    @property
    def skip_counts(self) -> dict[str, int]:
        """Skipped samples (and shards) by reason, so far, on this rank."""
        return dict(self._ledger.counts)

    @property
    def skipped_samples(self) -> list[tuple[str, str]]:
        """``(reason, "url#key")`` of the first skipped samples on this rank (``url`` alone for a shard)."""
        return list(self._ledger.names)

    def consumed_train_batches(self) -> int:
        """Training batches this rank has consumed since the start of training (drives exact resume).

        The module's own count when it keeps one (``train_batches_seen``, checkpointed by every phase:
        RL phases may take several optimizer steps per batch or several batches per step); otherwise
        ``trainer.global_step * trainer.accumulate_grad_batches`` (one optimizer step per accumulation window).
        """
        seen = getattr(self.trainer.lightning_module, "train_batches_seen", None)
        if isinstance(seen, int):
            return seen
        return self.trainer.global_step * self.trainer.accumulate_grad_batches

    def resolve(self, split: str) -> list[ResolvedSource]:
        """The listed and counted sources of a split (cached).

        Raises:
            FileNotFoundError: On a missing or empty shard directory or a missing shard (see ``missing_shards``).
        """
        if split not in self._resolved:
            self._resolved[split] = [resolve_source(name, src, self.missing_shards)
                                     for name, src in self.sources[split].items()]
            for src in self._resolved[split]:
                for url in src.missing:
                    self._ledger.add({"counts": {"missing_shard": 1}, "names": [("missing_shard", url)]})
        return self._resolved[split]

    def make_loader(self, split: str, rank: int, world_size: int, accumulate_grad_batches: int = 1,
                    position: Position | None = None) -> StreamingLoader:
        """Build the loader of one rank (also usable without a trainer, e.g. to simulate ranks).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            rank: This rank's index.
            world_size: Number of ranks.
            accumulate_grad_batches: The epoch length is rounded up to a multiple of this (train).
            position: ``() -> (data_epoch, consumed_batches)`` read at every ``iter()`` (train only).

        Returns:
            The loader; ``len()`` is the same on every rank.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        sources = self.resolve(split)
        if not sources:
            raise ValueError(f"{type(self).__name__} has no {split} sources")
        nw = max(1, self.num_workers)
        few = [s.name for s in sources if len(s.urls) < world_size * nw]
        if few:
            rank_zero_warn(f"sources {few} have fewer shards than the {world_size * nw} (rank, worker) slots: slots "
                           "share a shard by reading it whole and keeping every k-th sample; write more shards")
        if split == "train":
            per_rank = max(math.ceil(s.samples / (s.batch_size * world_size)) for s in sources)
            unit = math.lcm(nw, accumulate_grad_batches)
            per_worker = math.ceil(per_rank / unit) * unit // nw
        else:
            per_worker = eval_batches(sources, world_size * nw)
        persistent = self.persistent_workers and self.num_workers > 0
        dataset = SlotDataset(split, sources, self, rank, world_size, self.num_workers, self.seed,
                              self.shuffle_buffer if split == "train" else 0, per_worker, self.error_log_every,
                              self._ledger.max_names, shared_position=persistent)
        # A generator of its own: creating the loader's iterator must not draw from the global torch RNG, which
        # the phases sample from (a draw there would shift their noise, e.g. across epoch boundaries on resume).
        kwargs: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                                  "generator": torch.Generator().manual_seed(self.seed)}
        if self.num_workers > 0:
            kwargs.update(persistent_workers=persistent, multiprocessing_context=self.multiprocessing_context,
                          worker_init_fn=_single_threaded_worker)
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
        return StreamingLoader(dataset, per_worker * nw, self._ledger, position, kwargs)

    def for_workers(self) -> StreamingDataModule:
        """A shallow copy without the trainer and main-process state: what worker processes receive."""
        clone = copy.copy(self)
        clone.trainer = None
        clone._ledger = SkipLedger(0)
        return clone

    def _eval_loader(self, split: str) -> StreamingLoader | list:
        if not self.sources[split]:
            return []
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return self.make_loader(split, rank, world)
