"""Packed text-only token blocks (the output of ``python -m latent_mca pack-text``) as text batches.

Text-only corpora at paper scale are tokenised once, offline, into overlapping ``seq_len + 1`` token blocks
(:mod:`latent_mca.token_blocks`); this module streams them through the one streaming base class, so shard
shuffling, the rank/worker split, equal batch counts, exact resume and skip accounting are the base's.

Rows. One batch row is one block, used whole: ``input_ids`` are the block's ``seq_len + 1`` tokens and the
HF-style ``labels`` (aligned with ``input_ids``; the losses shift them) are the same tokens with the first
one ignored. The next-token targets of a row are therefore ``block[1:]``. Consecutive blocks overlap by
one token, so this makes every token of the packed stream (after its very first token) a target exactly
once; cutting rows to ``block[:-1]`` instead would lose the last target of every block. The attention mask
is all ones: blocks run across document boundaries (marked by the pack's end-of-document token), as usual
for packed pre-training data.

Using a pack as the text-only part of stage 1: :class:`PackSpec` (read with :func:`read_pack_spec`) and
:class:`BlockCodec` hold everything that is specific to packs (checking ``pack_info.json``, converting a
row batch size into samples, decoding and collating), so another data module such as ``MixedDataModule``
can route the samples of one source through them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from data_modules.collate import SampleError
from data_modules.streaming import ResolvedSource, ShardSource, expand_shards, is_local
from data_modules.webdataset_base import StreamingDataModule
from latent_mca.batch import IGNORE_INDEX, ChatInputs, TextBatch
from latent_mca.token_blocks import BlockFormatError, decode_block_sample, read_pack_info

#: Source name of the packed blocks in every split.
SOURCE = "text_blocks"
#: ``pack_info.json`` entries that every pack read together must share.
_SHARED = ("seq_len", "blocks_per_sample", "vocab_size", "eos_token_id")


@dataclass(frozen=True)
class PackSpec:
    """What the packs of one split say about their blocks (from their ``pack_info.json`` files).

    Attributes:
        seq_len: Tokens per block minus one (a row holds ``seq_len + 1`` tokens).
        blocks_per_sample: Blocks in every sample but the last of each pack.
        vocab_size: Vocabulary size of the tokenizer that wrote the packs.
        eos_token_id: End-of-document token id.
        dtype: Storage dtype of the first pack (``uint16`` or ``uint32``).
        dirs: Pack directories, in the order their shards were named.
        labels: Pack directory -> prefix of its row keys; empty for a single pack (keys are then unique).
    """

    seq_len: int
    blocks_per_sample: int
    vocab_size: int
    eos_token_id: int
    dtype: str
    dirs: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict)

    def samples_per_batch(self, rows: int, what: str = "batch_size") -> int:
        """Samples to read for a batch of ``rows`` blocks.

        Raises:
            ValueError: If ``rows`` is not a positive multiple of ``blocks_per_sample``.
        """
        if rows < 1 or rows % self.blocks_per_sample:
            raise ValueError(
                f"{what}={rows} counts blocks (rows) and must be a multiple of the {self.blocks_per_sample} blocks "
                f"per sample of the pack in {self.dirs[0]}; pick a multiple, or re-pack with pack-text "
                f"--blocks_per_sample set to a divisor of {rows}")
        return rows // self.blocks_per_sample


def pack_directories(shards: str | list[str]) -> list[str]:
    """The directories holding the shards of a shard spec (see :class:`ShardSource`), in order.

    Raises:
        ValueError: If a shard is not a local file (its ``pack_info.json`` cannot be found).
    """
    urls = expand_shards(shards)
    remote = [u for u in urls if not is_local(u)]
    if remote:
        raise ValueError(f"shards {remote[:3]} are not local files, so the pack_info.json beside them cannot be "
                         "read: pass pack_info=<a local directory holding a copy of it>")
    return list(dict.fromkeys(os.path.dirname(os.path.abspath(u)) for u in urls))


def read_pack_spec(shards: str | list[str], pack_info: str | None = None) -> PackSpec:
    """Read and cross-check the ``pack_info.json`` of every pack a shard spec names.

    Args:
        shards: The shard spec (directories, globs, brace patterns or shard paths).
        pack_info: A directory holding the ``pack_info.json`` that describes all of these shards (for
            remote shards); None: the one beside each shard is read.

    Returns:
        The packs' common description.

    Raises:
        FileNotFoundError: If a pack directory has no ``pack_info.json`` (the message names it).
        BlockFormatError: If a ``pack_info.json`` is incomplete, of another format or misses entries.
        ValueError: If the packs disagree on sequence length, blocks per sample, vocabulary or EOS id.
    """
    dirs = [os.path.abspath(pack_info)] if pack_info is not None else pack_directories(shards)
    infos = {d: read_pack_info(d) for d in dirs}
    first, info = dirs[0], infos[dirs[0]]
    for d in dirs[1:]:
        differ = {k: (info[k], infos[d][k]) for k in _SHARED if infos[d][k] != info[k]}
        if differ:
            raise ValueError(f"packs {first} and {d} cannot be streamed together: they differ in {differ}")
    labels: dict[str, str] = {}
    if len(dirs) > 1:  # sample keys restart at 0 in every pack: prefix them so row keys stay unique
        names = [os.path.basename(d) for d in dirs]
        labels = dict(zip(dirs, names if len(set(names)) == len(names) else dirs))
    return PackSpec(int(info["seq_len"]), int(info["blocks_per_sample"]), int(info["vocab_size"]),
                    int(info["eos_token_id"]), str(info["dtype"]), tuple(dirs), labels)


@dataclass
class BlockItem:
    """The blocks of one packed sample.

    Attributes:
        keys: Row keys ``<sample key>/<block index>`` (prefixed by the pack when a split has several).
        blocks: Token ids, shape ``(n_blocks, seq_len + 1)``.
        scored: Whether the rows count as targets (False for evaluation padding repeats).
    """

    keys: list[str]
    blocks: Tensor  # (n_blocks, seq_len + 1) long
    scored: bool = True


class BlockCodec:
    """Decode packed samples into :class:`BlockItem` and collate them into :class:`TextBatch`.

    Args:
        spec: The description of the packs the samples come from.
    """

    def __init__(self, spec: PackSpec) -> None:
        self.spec = spec

    def decode(self, sample: dict[str, Any]) -> BlockItem:
        """Check one raw sample against the pack and take its blocks.

        Raises:
            SampleError: ``bad_blocks`` (no or undecodable ``tokens.npy``), ``block_length`` (another
                ``seq_len``), ``too_many_blocks`` (more than ``blocks_per_sample``) or ``token_out_of_vocab``.
        """
        spec = self.spec
        try:
            blocks = decode_block_sample(sample)  # (n, L + 1); the length is checked below, with its own reason
        except BlockFormatError as exc:
            raise SampleError("bad_blocks", str(exc)) from exc
        key = sample["__key__"]
        if blocks.shape[1] != spec.seq_len + 1:
            raise SampleError("block_length", f"sample {key!r}: blocks hold {blocks.shape[1]} tokens, the pack's "
                                              f"seq_len + 1 is {spec.seq_len + 1}")
        if blocks.shape[0] > spec.blocks_per_sample:
            raise SampleError("too_many_blocks", f"sample {key!r}: {blocks.shape[0]} blocks, the pack puts at most "
                                                 f"{spec.blocks_per_sample} in a sample")
        top = int(blocks.max())
        if top >= spec.vocab_size:
            raise SampleError("token_out_of_vocab", f"sample {key!r}: token id {top} >= vocab_size "
                                                    f"{spec.vocab_size}")
        url = sample.get("__url__")
        label = spec.labels.get(os.path.dirname(os.path.abspath(url))) if spec.labels and url else None
        prefix = f"{label}/{key}" if label else key
        return BlockItem([f"{prefix}/{j}" for j in range(blocks.shape[0])], blocks,
                         scored=not sample.get("__repeat__", False))

    @staticmethod
    def batch(items: list[BlockItem]) -> TextBatch:
        """Stack the blocks of several samples into one text batch, one row per block.

        Every row is a whole block; its labels are the block with the first token ignored (that token was
        the previous block's last target). Rows of evaluation padding repeats have no labels at all, so no
        token is scored twice.
        """
        input_ids = torch.cat([it.blocks for it in items])  # (N, L + 1)
        labels = input_ids.clone()
        labels[:, 0] = IGNORE_INDEX
        scored = torch.cat([torch.full((len(it.keys),), it.scored) for it in items])  # (N,)
        labels[~scored] = IGNORE_INDEX
        text = ChatInputs(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
        return TextBatch(text=text, keys=[k for it in items for k in it.keys])


class TokenBlockDataModule(StreamingDataModule):
    """Stream packed token blocks (``pack-text`` output) as :class:`~latent_mca.batch.TextBatch`.

    ``batch_size`` counts blocks (rows of the batch, per rank) and must be a multiple of the pack's blocks
    per sample: each batch reads ``batch_size // blocks_per_sample`` whole samples, so exact resume and
    equal batch counts work as for any other source. A batch holds fewer rows only when it contains the
    pack's last, shorter sample or a skipped one. Row ``i`` of ``text.input_ids`` is one whole block of
    ``seq_len + 1`` tokens; see the module docstring for why, and for the labels.

    Each pack's ``pack_info.json`` is read at setup (it gives ``seq_len``, blocks per sample, the dtype and the
    end-of-document id; see :attr:`packs`). Corrupt or mis-sized samples are skipped and counted as
    ``data/skipped_<reason>`` (reasons in :meth:`BlockCodec.decode`).

    Args:
        train: Training shards: a ``pack-text`` output directory, a glob, a brace pattern, or a list of
            those. Several packs must share the sequence length, blocks per sample and tokenizer.
        val: Held-out shards, same forms (None: no validation).
        batch_size: Blocks (rows) per batch and rank; a multiple of the pack's ``blocks_per_sample``.
        num_workers: Loader workers per rank.
        shuffle_buffer: Samples (each of ``blocks_per_sample`` blocks) in each worker's shuffle buffer.
        seed: Data seed.
        samples_per_epoch: Packed samples (not blocks) per training epoch; default: from ``sizes.json``.
            Required for remote shards.
        pack_info: A local directory holding the ``pack_info.json`` of the pack, used for every split; needed
            when the shards are remote (``pipe:``, ``https:``). None: read the file beside the shards.
    """

    def __init__(self, train: str | list[str], val: str | list[str] | None = None, batch_size: int = 8,
                 num_workers: int = 2, shuffle_buffer: int = 100, seed: int = 0,
                 samples_per_epoch: int | None = None, pack_info: str | None = None) -> None:
        # The sources' batch sizes (in samples) are only known once pack_info.json is read (see resolve).
        super().__init__(
            train={SOURCE: ShardSource(train, batch_size, samples_per_epoch)},
            val={SOURCE: ShardSource(val, batch_size)} if val else None,
            num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed)
        self.batch_size = batch_size
        self.pack_info = pack_info
        #: The :class:`PackSpec` of each split read so far.
        self.packs: dict[str, PackSpec] = {}
        self._codecs: dict[str, BlockCodec] = {}

    @property
    def seq_len(self) -> int:
        """The training pack's sequence length (rows hold ``seq_len + 1`` tokens); reads it if needed."""
        return self._spec("train").seq_len

    @property
    def eos_token_id(self) -> int:
        """The training pack's end-of-document token id."""
        return self._spec("train").eos_token_id

    def resolve(self, split: str) -> list[ResolvedSource]:
        """Read the split's ``pack_info.json`` (setting its batch size in samples), then list its shards."""
        if self.sources[split] and split not in self.packs:
            self._spec(split)
        return super().resolve(split)

    def _spec(self, split: str) -> PackSpec:
        if split in self.packs:
            return self.packs[split]
        source = self.sources[split][SOURCE]
        spec = read_pack_spec(source.shards, self.pack_info)
        for other, known in self.packs.items():
            differ = {k: (getattr(known, k), getattr(spec, k)) for k in ("vocab_size", "eos_token_id")
                      if getattr(known, k) != getattr(spec, k)}
            if differ:
                raise ValueError(f"the {split} pack ({spec.dirs[0]}) and the {other} pack ({known.dirs[0]}) come "
                                 f"from different tokenizers: {differ}")
        source.batch_size = spec.samples_per_batch(self.batch_size)
        self.packs[split], self._codecs[split] = spec, BlockCodec(spec)
        return spec

    def decode_item(self, sample: dict[str, Any]) -> BlockItem:
        """A packed sample -> its checked blocks."""
        return self._codecs[sample["__split__"]].decode(sample)

    def collate(self, items: list[BlockItem]) -> TextBatch:
        """Stack the blocks into a text batch."""
        return BlockCodec.batch(items)
