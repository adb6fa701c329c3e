"""Pure stages of the streaming pipeline behind :class:`~data_modules.webdataset_base.StreamingDataModule`.

No Lightning here; everything is deterministic given (seed, epoch, rank, worker). :func:`resolve_source`
lists and counts shards; :func:`train_plan` / :func:`eval_plan` assign them to the ``world_size *
num_workers`` (rank, worker) *slots*; :class:`SkipStats` is a worker's rate-limited error handler;
:class:`SlotDataset` is what a DataLoader worker runs, yielding ``(batch, skips)`` pairs.
"""

from __future__ import annotations

import glob
import heapq
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import braceexpand
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from latent_mca.shards import read_sizes

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")
_GLOB_CHARS = ("*", "?", "[")


@dataclass
class ShardSource:
    """One named stream of shards and how many of its samples go into every batch.

    Args:
        shards: A directory holding ``*.tar`` + ``sizes.json``, a brace pattern
            (``dir/train-{000000..000009}.tar``), a glob (``dir/train-*.tar``), any URL webdataset opens
            (``pipe:aws s3 cp s3://b/x.tar -``, ``https://...``), or a list of those.
        batch_size: Samples of this source in every batch (per rank).
        samples_per_epoch: Samples that make one epoch of this source; default: the sum of the shards'
            counts in ``sizes.json``. Required for remote URLs, whose counts cannot be read.
    """

    shards: str | list[str]
    batch_size: int = 8
    samples_per_epoch: int | None = None


@dataclass
class ResolvedSource:
    """A source after :func:`resolve_source`: shard URLs, samples per shard and epoch, skipped missing shards.

    ``counts`` are spread evenly over the shards when only ``samples_per_epoch`` is known.
    """

    name: str
    urls: list[str]
    counts: list[int]
    batch_size: int
    samples: int
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Piece:
    """The part of one shard a slot reads: samples whose index in the shard is ``offset`` modulo ``stride``."""

    url: str
    offset: int = 0
    stride: int = 1
    count: int = 0


def is_local(url: str) -> bool:
    """Whether a shard URL is a local path (no ``scheme:`` prefix such as ``pipe:`` or ``https:``)."""
    return not _SCHEME.match(url)


def _expand_one(spec: str) -> list[str]:
    if not is_local(spec):
        return list(braceexpand.braceexpand(spec))
    spec = os.path.expanduser(spec)
    if "{" in spec:
        return list(braceexpand.braceexpand(spec))
    if any(c in spec for c in _GLOB_CHARS):
        matches = sorted(glob.glob(spec))
        if not matches:
            raise FileNotFoundError(f"shard pattern {spec!r} matches no file")
        return matches
    if os.path.isdir(spec):
        on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(spec, "*.tar"))}
        sizes_path = os.path.join(spec, "sizes.json")
        listed = set(read_sizes(spec)) if os.path.exists(sizes_path) else set()
        names = sorted(on_disk | {n for n in listed if n.endswith(".tar")})
        if not names:
            raise FileNotFoundError(f"shard directory {spec!r} holds no *.tar shards")
        return [os.path.join(spec, n) for n in names]
    return [spec]


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """List the shard URLs a spec names (see :class:`ShardSource`), in order, without duplicates.

    Raises:
        FileNotFoundError: If a directory holds no shards or a glob matches nothing.
        ValueError: If the spec names no shard at all.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = list(dict.fromkeys(u for s in specs for u in _expand_one(s)))
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shard")
    return urls


def _shard_counts(name: str, urls: list[str], samples_per_epoch: int | None) -> list[int]:
    if samples_per_epoch is not None:
        # Only the epoch length is known: spread it evenly (used to balance evaluation shards).
        base, extra = divmod(samples_per_epoch, len(urls))
        return [base + (i < extra) for i in range(len(urls))]
    if not all(is_local(u) for u in urls):
        raise ValueError(f"source {name!r}: cannot count samples of remote shards; set samples_per_epoch")
    sizes: dict[str, dict[str, int]] = {}
    counts = []
    for url in urls:
        directory, base = os.path.split(url)
        if directory not in sizes:
            sizes[directory] = read_sizes(directory or ".")
        if base not in sizes[directory]:
            raise ValueError(f"source {name!r}: shard {url} is not listed in {os.path.join(directory, 'sizes.json')}")
        counts.append(int(sizes[directory][base]))
    return counts


def resolve_source(name: str, source: ShardSource, missing_shards: str = "error") -> ResolvedSource:
    """List and count the shards of one source.

    Args:
        name: The source's name, used in messages.
        source: The source's configuration.
        missing_shards: ``"error"``: a shard that does not exist (named by the spec or by ``sizes.json`` in a
            shard directory) raises; ``"skip"``: it is dropped and reported, as long as others remain.

    Returns:
        The resolved source.

    Raises:
        FileNotFoundError: On missing shards (policy ``"error"``, or none left), a missing ``sizes.json``.
        ValueError: On a bad batch size, an unlisted shard or a source with no samples.
    """
    if source.batch_size < 1:
        raise ValueError(f"source {name!r}: batch_size must be >= 1, got {source.batch_size}")
    urls = expand_shards(source.shards)
    missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
    if missing and (missing_shards == "error" or len(missing) == len(urls)):
        raise FileNotFoundError(f"source {name!r}: {len(missing)} shard(s) do not exist: {missing[:10]}")
    if missing:
        log.warning("source %r: skipping %d missing shard(s): %s", name, len(missing), missing[:10])
        urls = [u for u in urls if u not in missing]
    counts = _shard_counts(name, urls, source.samples_per_epoch)
    samples = source.samples_per_epoch if source.samples_per_epoch is not None else sum(counts)
    if samples < 1:
        raise ValueError(f"source {name!r} has no samples (shards {urls[:5]}...)")
    return ResolvedSource(name, urls, counts, source.batch_size, samples, missing)


def train_plan(source: ResolvedSource, seed: int, epoch: int, n_slots: int) -> list[list[Piece]]:
    """Assign shards to training slots for one epoch.

    The permutation depends on (seed, epoch, source name) only, so every rank computes the same one; it is
    applied before the split into slots. With fewer shards than slots, the slots that share a shard keep
    interleaved samples of it, so slots stay disjoint (at the cost of reading the shard several times).

    Returns:
        For every slot, the pieces it reads (cycled by the reader).
    """
    n = len(source.urls)
    order = list(range(n))
    random.Random(f"shards/{seed}/{epoch}/{source.name}").shuffle(order)
    urls, counts = [source.urls[i] for i in order], [source.counts[i] for i in order]
    if n < n_slots:
        return _shared_plan(urls, counts, n_slots)
    return [[Piece(urls[j], count=counts[j]) for j in range(slot, n, n_slots)] for slot in range(n_slots)]


def _shared_plan(urls: list[str], counts: list[int], n_slots: int) -> list[list[Piece]]:
    """Fewer shards than slots: slot ``s`` keeps every k-th sample of shard ``s % n``."""
    plan = []
    for slot in range(n_slots):
        j, offset = slot % len(urls), slot // len(urls)
        stride = len(range(j, n_slots, len(urls)))
        plan.append([Piece(urls[j], offset, stride, len(range(offset, counts[j], stride)))])
    return plan


def eval_plan(source: ResolvedSource, n_slots: int) -> list[list[Piece]]:
    """Assign shards to evaluation slots so that every sample is read exactly once, balanced by counts.

    Shards go (largest first) to the least-loaded slot; with fewer shards than slots, slots share shards
    by interleaving samples. No randomness: every run reads the same samples in the same order.
    """
    n, urls, counts = len(source.urls), source.urls, source.counts
    if n < n_slots:
        return _shared_plan(urls, counts, n_slots)
    heap = [(0, slot) for slot in range(n_slots)]
    owner = [0] * n
    for i in sorted(range(n), key=lambda i: (-counts[i], i)):
        load, slot = heapq.heappop(heap)
        owner[i] = slot
        heapq.heappush(heap, (load + counts[i], slot))
    return [[Piece(urls[i], count=counts[i]) for i in range(n) if owner[i] == slot] for slot in range(n_slots)]


def eval_batches(sources: Sequence[ResolvedSource], n_slots: int) -> int:
    """Batches every evaluation slot yields: enough for the fullest slot (at least one)."""
    most = 1
    for src in sources:
        for pieces in eval_plan(src, n_slots):
            most = max(most, math.ceil(sum(p.count for p in pieces) / src.batch_size))
    return most


def skip_reason(exc: BaseException, stage: str) -> str | None:
    """The skip reason for an exception, or None if it is not a data error (then it must propagate).

    ``stage`` is ``"read"`` (opening or expanding a shard) or ``"decode"`` (the subclass's ``decode_item``).
    Any exception with a string ``reason`` attribute (``SampleError``) keeps its own reason.
    """
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason
    if stage == "read":
        if isinstance(exc, FileNotFoundError):
            return "missing_shard"
        return "bad_tar" if isinstance(exc, (tarfile.TarError, EOFError, ValueError)) else "read_error"
    if isinstance(exc, json.JSONDecodeError):
        return "bad_json"
    if isinstance(exc, UnicodeDecodeError):
        return "bad_text"
    if type(exc).__name__ == "UnidentifiedImageError":
        return "bad_image"
    return "decode_error" if isinstance(exc, (ValueError, OSError)) else None


class SkipStats:
    """Rate-limited skip handler of one worker: counts skips by reason and remembers their names.

    Args:
        where: Who is reading (for log messages), e.g. ``"train rank 0 worker 1"``.
        log_every: Log the first skip and then every ``log_every``-th (never sleeps).
        max_names: Names (``url#key``) sent to the main process at most, per worker iteration.
    """

    def __init__(self, where: str, log_every: int = 1000, max_names: int = 1000) -> None:
        self.where = where
        self.log_every = max(1, log_every)
        self.max_names = max_names
        self.total = 0
        self._names_sent = 0
        self._counts: Counter[str] = Counter()
        self._names: list[tuple[str, str]] = []

    def record(self, reason: str, name: str, exc: BaseException | None = None) -> None:
        """Count one skipped sample (or shard) and log it if it is the first or an N-th one."""
        self.total += 1
        self._counts[reason] += 1
        if self._names_sent < self.max_names:
            self._names.append((reason, name))
            self._names_sent += 1
        if self.total == 1 or self.total % self.log_every == 0:
            log.warning("skipped %s (%s): %s [skip #%d in %s; logging every %d-th]",
                        name, reason, exc if exc is not None else "", self.total, self.where, self.log_every)

    def drain(self) -> dict[str, Any]:
        """The skips recorded since the last call, as ``{"counts": {...}, "names": [(reason, name)...]}``."""
        delta = {"counts": dict(self._counts), "names": list(self._names)}
        self._counts.clear()
        self._names.clear()
        return delta


def read_shard(url: str, stats: SkipStats) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__`` and one bytes value per extension) of one tar shard.

    A missing, truncated or otherwise unreadable shard is counted in ``stats`` and ends early; the
    sample being read when the error happened is dropped (it may be incomplete).
    """
    try:
        stream = wds.gopen(url)
    except Exception as exc:  # any open failure is a data problem of this shard
        stats.record(skip_reason(exc, "read") or "read_error", url, exc)
        return
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception, eof_value=None)
        yield from group_by_keys(files, handler=reraise_exception)
    except Exception as exc:
        stats.record(skip_reason(exc, "read") or "read_error", url, exc)
    finally:
        stream.close()


def read_pieces(pieces: Sequence[Piece], stats: SkipStats) -> Iterator[dict[str, Any]]:
    """Raw samples of a slot's pieces, once, in order."""
    for piece in pieces:
        for index, sample in enumerate(read_shard(piece.url, stats)):
            if index % piece.stride == piece.offset:
                yield sample


def cycled_stream(pieces: Sequence[Piece], stats: SkipStats, shuffle_buffer: int, seed: str) -> Iterator[dict]:
    """A training slot's endless stream: pass after pass over its pieces, each pass shuffled on its own.

    Shuffling per pass (the buffer is flushed at the end of a pass) means a slot sees each of its samples
    once before any repeats; the seed of pass ``p`` is ``f"{seed}/{p}"``.

    Raises:
        RuntimeError: When a whole pass yields no sample (every shard of the slot is unreadable).
    """
    for index in itertools.count():
        raw = read_pieces(pieces, stats)
        if shuffle_buffer > 1:
            raw = wds.shuffle(shuffle_buffer, shuffle_buffer, seed=f"{seed}/{index}")(raw)
        got = 0
        for sample in raw:
            got += 1
            yield sample
        if got == 0:
            raise RuntimeError(f"{stats.where}: no readable sample in shards {[p.url for p in pieces][:10]}")


_SKIPPED = object()
#: Batches in a row that may lose every sample before a worker gives up (the data or decode_item is broken).
MAX_EMPTY_BATCHES = 100


def _take(iterator: Iterator[Any], n: int) -> list[Any]:
    return list(itertools.islice(iterator, n))


def _sample_name(sample: dict[str, Any]) -> str:
    return f"{sample.get('__url__')}#{sample.get('__key__')}"


class SlotDataset(IterableDataset):
    """The per-worker pipeline; each worker of each rank is one slot of the plan.

    Train: every slot yields ``batches_per_worker`` batches per epoch from its cycled shards, through a
    shuffle buffer seeded by (seed, epoch, rank, worker, source). After ``consumed`` batches of the epoch
    (a resumed run), physical worker ``w`` plays logical worker ``(w + consumed) % num_workers`` (the
    DataLoader takes batch ``i`` from worker ``i % num_workers``) and skips that worker's finished batches
    as raw bytes, before any decoding. Eval: no shuffle, every sample once; slots with fewer samples pad
    with repeats (``__repeat__`` True) so that every slot yields ``batches_per_worker`` batches.

    ``hooks`` (the data module) provides ``decode_item(sample)`` and ``collate(items)`` and may provide
    ``for_workers()``, the copy that is pickled to worker processes. A failed decode drops the item (the
    batch is shorter); a batch that lost every item is replaced by the previous one, keeping counts equal.
    """

    def __init__(self, split: str, sources: list[ResolvedSource], hooks: Any, rank: int, world_size: int,
                 num_workers: int, seed: int, shuffle_buffer: int, batches_per_worker: int,
                 log_every: int = 1000, max_names: int = 1000, shared_position: bool = False) -> None:
        super().__init__()
        self.split, self.sources, self.hooks = split, sources, hooks
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.seed, self.shuffle_buffer, self.batches_per_worker = seed, shuffle_buffer, batches_per_worker
        self.log_every, self.max_names = log_every, max_names
        # Persistent workers keep their copy of this object: the position must live in shared memory.
        self._position: Any = multiprocessing.RawArray("q", 2) if shared_position else [0, 0]

    def set_position(self, epoch: int, consumed: int) -> None:
        """Start the next iteration at batch ``consumed`` (per rank) of data epoch ``epoch``."""
        self._position[0], self._position[1] = epoch, consumed

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        detach = getattr(self.hooks, "for_workers", None)
        state["hooks"] = detach() if detach is not None else self.hooks
        return state

    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if nw != self.num_workers:
            raise RuntimeError(f"SlotDataset planned for {self.num_workers} workers runs in {nw}")
        epoch, consumed = (int(self._position[0]), int(self._position[1])) if self.split == "train" else (0, 0)
        logical = (worker + consumed) % nw
        done = max(0, math.ceil((consumed - logical) / nw))
        slot = self.rank * nw + logical
        stats = SkipStats(f"{self.split} rank {self.rank} worker {logical}", self.log_every, self.max_names)
        if self.split == "train":
            chunks = self._train_chunks(epoch, slot, logical, stats)
            for _ in range(done):
                next(chunks)
        else:
            chunks = self._eval_chunks(slot, stats)
        yield from self._emit(chunks, self.batches_per_worker - done, stats)

    def _train_chunks(self, epoch: int, slot: int, logical: int, stats: SkipStats) -> Iterator[list]:
        n_slots = self.world_size * self.num_workers
        streams = [(src, cycled_stream(train_plan(src, self.seed, epoch, n_slots)[slot], stats, self.shuffle_buffer,
                                       f"samples/{self.seed}/{epoch}/{self.rank}/{logical}/{src.name}"))
                   for src in self.sources]
        while True:
            yield [(src.name, _take(raw, src.batch_size)) for src, raw in streams]

    def _eval_chunks(self, slot: int, stats: SkipStats) -> Iterator[list]:
        n_slots = self.world_size * self.num_workers
        streams = [(src, read_pieces(eval_plan(src, n_slots)[slot], stats)) for src in self.sources]
        pad = None
        for index in itertools.count():
            chunk = [(src.name, _take(raw, src.batch_size)) for src, raw in streams]
            if index == self.batches_per_worker - 1:
                # sizes.json undercounted this slot's shards: report what no batch will hold.
                for _, raw in streams:
                    for extra in raw:
                        stats.record("beyond_sizes_json", _sample_name(extra))
            if not any(items for _, items in chunk):
                pad = pad or self._padding(slot, stats)
                chunk = [(pad[0], [{**pad[1], "__repeat__": True}])]
            yield chunk

    def _padding(self, slot: int, stats: SkipStats) -> tuple[str, dict[str, Any]]:
        """The sample that pads this slot's batches: its own first sample, else slot 0's."""
        n_slots = self.world_size * self.num_workers
        for src in self.sources:
            plan = eval_plan(src, n_slots)
            for pieces in (plan[slot], plan[0]):
                first = next(read_pieces(pieces, stats), None)
                if first is not None:
                    return src.name, first
        raise RuntimeError(f"{stats.where}: no readable sample to pad evaluation batches with")

    def _emit(self, chunks: Iterator[list], n: int, stats: SkipStats) -> Iterator[tuple[Any, dict[str, Any]]]:
        previous, misses = None, 0
        while n > 0:
            items = []
            for name, raws in next(chunks):
                for raw in raws:
                    raw.update(__source__=name, __split__=self.split, __repeat__=raw.get("__repeat__", False))
                    item = self._decode(raw, stats)
                    if item is not _SKIPPED:
                        items.append(item)
            if items:
                previous, misses = self.hooks.collate(items), 0
            elif previous is None:
                misses += 1
                if misses >= MAX_EMPTY_BATCHES:
                    raise RuntimeError(f"{stats.where}: {misses} batches in a row lost every sample; see the "
                                       "skip warnings above (broken data or decode_item)")
                continue
            else:
                stats.record("repeated_batch", stats.where)
            n -= 1
            yield previous, stats.drain()

    def _decode(self, raw: dict[str, Any], stats: SkipStats) -> Any:
        try:
            return self.hooks.decode_item(raw)
        except Exception as exc:
            reason = skip_reason(exc, "decode")
            if reason is None:
                raise RuntimeError(f"decode_item failed on sample {_sample_name(raw)}: {exc!r}") from exc
            stats.record(reason, _sample_name(raw), exc)
            return _SKIPPED
