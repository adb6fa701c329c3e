"""Packed token blocks: the on-disk format of text-only corpora tokenised offline by ``pack-text``.

At paper scale the text-only corpus is hundreds of billions of tokens, so it is tokenised once and stored
as fixed-length blocks in webdataset shards; training streams the blocks and never tokenises online.

Format (version 1)
------------------
Token stream
    Every document is tokenised (conversations rendered with the backbone's chat template first) and
    followed by the end-of-document token; the documents are concatenated in input order into one stream.
Blocks
    Block ``b`` is ``stream[b * seq_len : b * seq_len + seq_len + 1]``: ``seq_len + 1`` tokens, so that
    ``block[:-1]`` are the inputs and ``block[1:]`` the next-token targets. Consecutive blocks overlap by
    exactly one token (the stride is ``seq_len``), so every stream token after the first is a target
    exactly once. Block 0 followed by ``block[1:]`` of every later block gives back
    ``stream[: n_blocks * seq_len + 1]`` (:func:`join_blocks`). The overlap runs across sample and shard
    boundaries too: the whole pack is one stream.
Tail
    Stream tokens after the last full block are dropped; ``pack_info.json`` counts them
    (``dropped_tail_tokens`` = ``tokens`` - ``tokens_in_blocks``).
Samples
    One sample = ``__key__`` (the sample index, zero-padded to 12 digits) + one file ``tokens.npy``: a NumPy
    ``.npy`` array (no pickle) of shape ``(n_blocks, seq_len + 1)`` and dtype ``uint16`` when the vocabulary
    has at most 65535 entries, else ``uint32``. Every sample holds ``blocks_per_sample`` blocks except the
    last sample of the pack, which may hold fewer (``last_sample_blocks``).
Shards
    ``{prefix}-000000.tar``, ``{prefix}-000001.tar``, ... with ``samples_per_shard`` samples each (the last
    may hold fewer); ``sizes.json`` maps each shard to its number of SAMPLES; ``pack_info.json``
    (:data:`PACK_INFO_NAME`) records the format, ``seq_len``, dtype, tokenizer, vocabulary size,
    end-of-document id, the counts (documents, tokens, blocks, samples, dropped tail, skips), the blocks
    of each shard and the input files; ``"complete": false`` marks a pack whose writing was interrupted.
    Skipped inputs are listed in ``pack_skipped.jsonl``.

Reading: ``webdataset`` yields raw samples (bytes by extension); :func:`decode_block_sample` turns one into
a ``LongTensor`` of shape ``(n_blocks, seq_len + 1)`` with a clear error naming the key when it is corrupt.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latent_mca.shards import ShardSink

FORMAT_NAME = "latent_mca.token_blocks"
FORMAT_VERSION = 1
#: The sample field holding the blocks.
TOKENS_FIELD = "tokens.npy"
PACK_INFO_NAME = "pack_info.json"
SKIPPED_NAME = "pack_skipped.jsonl"
KEY_DIGITS = 12
_DTYPES = {"uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}
_REQUIRED_INFO = ("seq_len", "dtype", "blocks_per_sample", "eos_token_id", "vocab_size", "samples", "blocks")


class BlockFormatError(ValueError):
    """A packed-token sample or ``pack_info.json`` that does not follow the block format."""


def block_dtype(vocab_size: int) -> np.dtype:
    """The storage dtype for token ids of a vocabulary: ``uint16`` up to 65535 entries, else ``uint32``.

    Raises:
        ValueError: If the vocabulary is empty or does not fit in 32 bits.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size <= 65535:
        return _DTYPES["uint16"]
    if vocab_size <= 2**32 - 1:
        return _DTYPES["uint32"]
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


def sample_key(index: int) -> str:
    """The key of sample ``index`` (zero-padded, so keys sort in stream order)."""
    return f"{index:0{KEY_DIGITS}d}"


def encode_blocks(blocks: np.ndarray) -> bytes:
    """Serialise a ``(n_blocks, seq_len + 1)`` block array as ``.npy`` bytes (the ``tokens.npy`` field)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(blocks), allow_pickle=False)
    return buf.getvalue()


def _where(sample: dict[str, Any]) -> str:
    key = sample.get("__key__", "<no __key__>")
    url = sample.get("__url__")
    return f"{key!r}" + (f" of {url}" if url else "")


def decode_block_sample(sample: dict[str, Any], seq_len: int | None = None) -> Tensor:
    """Decode one raw webdataset sample of a pack into its blocks.

    Args:
        sample: The raw sample: ``__key__`` (and ``__url__`` when read from a shard) plus ``tokens.npy``
            as bytes (an already decoded array is accepted too).
        seq_len: Expected sequence length (blocks hold ``seq_len + 1`` tokens); None skips the check.

    Returns:
        LongTensor of shape ``(n_blocks, seq_len + 1)``.

    Raises:
        BlockFormatError: If the field is missing, not a ``.npy`` array, of another dtype or rank, empty,
            or of another block length; the message names the sample's key (and shard).
    """
    where = _where(sample)
    if TOKENS_FIELD not in sample:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise BlockFormatError(f"sample {where} has no {TOKENS_FIELD!r} field (it has {fields})")
    data = sample[TOKENS_FIELD]
    if isinstance(data, np.ndarray):
        array = data
    elif isinstance(data, (bytes, bytearray, memoryview)):
        try:
            array = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise BlockFormatError(f"sample {where}: {TOKENS_FIELD} is not a valid .npy array ({exc})") from None
    else:
        raise BlockFormatError(f"sample {where}: {TOKENS_FIELD} is a {type(data).__name__}, expected bytes")
    if array.dtype not in _DTYPES.values():
        raise BlockFormatError(f"sample {where}: blocks have dtype {array.dtype}, expected uint16 or uint32")
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 2:
        raise BlockFormatError(f"sample {where}: blocks have shape {tuple(array.shape)}, expected "
                               "(n_blocks >= 1, seq_len + 1 >= 2)")
    if seq_len is not None and array.shape[1] != seq_len + 1:
        raise BlockFormatError(f"sample {where}: blocks hold {array.shape[1]} tokens, expected seq_len + 1 = "
                               f"{seq_len + 1}")
    return torch.from_numpy(array.astype(np.int64))  # (n_blocks, seq_len + 1)


def join_blocks(blocks: Tensor | np.ndarray) -> Tensor:
    """The token stream covered by consecutive blocks.

    The first block is taken whole, then each later block without its first token (the overlap).

    Args:
        blocks: Consecutive blocks, shape ``(n_blocks, seq_len + 1)``; samples read in key order can be
            concatenated along dim 0 first.

    Returns:
        LongTensor of shape ``(n_blocks * seq_len + 1,)``.
    """
    blocks = torch.as_tensor(blocks, dtype=torch.long)
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise ValueError(f"expected blocks of shape (n_blocks >= 1, seq_len + 1), got {tuple(blocks.shape)}")
    return torch.cat([blocks[0], blocks[1:, 1:].reshape(-1)])  # (n_blocks * seq_len + 1,)


class BlockPacker:
    """Cut a token stream, fed piece by piece, into samples of overlapping ``seq_len + 1`` blocks.

    Memory stays bounded by about one sample's worth of tokens, whatever the stream's length.

    Args:
        seq_len: Tokens per block minus one (the stride between blocks).
        blocks_per_sample: Blocks per emitted sample.
        dtype: Storage dtype (:func:`block_dtype`); every id is checked to fit it.
    """

    def __init__(self, seq_len: int, blocks_per_sample: int, dtype: np.dtype | str = "uint16") -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if blocks_per_sample < 1:
            raise ValueError(f"blocks_per_sample must be >= 1, got {blocks_per_sample}")
        self.seq_len = seq_len
        self.blocks_per_sample = blocks_per_sample
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be uint16 or uint32, got {self.dtype}")
        self._limit = int(np.iinfo(self.dtype).max)
        self._pending: list[np.ndarray] = []
        self._buffered = 0
        self._finished = False
        self.tokens = 0
        self.blocks = 0

    @property
    def tokens_in_blocks(self) -> int:
        """Stream tokens covered by the blocks emitted so far (the overlap counted once)."""
        return self.blocks * self.seq_len + 1 if self.blocks else 0

    @property
    def dropped_tail_tokens(self) -> int:
        """Tokens fed but in no block (after :meth:`finish`: the dropped partial tail)."""
        return self.tokens - self.tokens_in_blocks

    def add(self, tokens: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """Append tokens to the stream.

        Args:
            tokens: Token ids (one document plus its end-of-document token, typically).

        Returns:
            The samples completed by these tokens, each of shape ``(blocks_per_sample, seq_len + 1)``.

        Raises:
            ValueError: If an id is negative or does not fit the dtype, or after :meth:`finish`.
        """
        if self._finished:
            raise ValueError("BlockPacker.add after finish")
        ids = np.asarray(tokens)
        if ids.size == 0:
            return []
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"expected a 1-D sequence of integer token ids, got {ids.dtype} of shape {ids.shape}")
        if int(ids.min()) < 0 or int(ids.max()) > self._limit:
            raise ValueError(f"token ids must lie in [0, {self._limit}] for {self.dtype}, got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        self._pending.append(ids.astype(self.dtype, copy=False))
        self._buffered += ids.size
        self.tokens += ids.size
        span = self.blocks_per_sample * self.seq_len
        if self._buffered < span + 1:
            return []
        stream = np.concatenate(self._pending)
        n_samples = (stream.size - 1) // span
        samples = [self._cut(stream[i * span: (i + 1) * span + 1]) for i in range(n_samples)]
        rest = stream[n_samples * span:]  # starts with the last block's final token, shared with the next block
        self._pending, self._buffered = [rest], rest.size
        return samples

    def finish(self) -> np.ndarray | None:
        """End the stream: the full blocks still buffered as one last (shorter) sample, or None.

        The tokens after the last full block are dropped (see :attr:`dropped_tail_tokens`).
        """
        if self._finished:
            return None
        self._finished = True
        stream = np.concatenate(self._pending) if self._pending else np.empty(0, self.dtype)
        self._pending, self._buffered = [], 0
        n_blocks = (stream.size - 1) // self.seq_len if stream.size > self.seq_len else 0
        return self._cut(stream[: n_blocks * self.seq_len + 1]) if n_blocks else None

    def _cut(self, span: np.ndarray) -> np.ndarray:
        """Overlapping blocks of a span of ``n * seq_len + 1`` tokens, shape ``(n, seq_len + 1)``."""
        windows = np.lib.stride_tricks.sliding_window_view(span, self.seq_len + 1)[:: self.seq_len]
        self.blocks += windows.shape[0]
        return windows.copy()  # (n, seq_len + 1), contiguous


class BlockWriter:
    """Pack a token stream into block samples and write them as shards: the writer side of the format.

    Args:
        out_dir: Output directory (created).
        seq_len: Sequence length; blocks hold ``seq_len + 1`` tokens.
        blocks_per_sample: Blocks per sample.
        dtype: Storage dtype (:func:`block_dtype`).
        prefix: Shard name prefix.
        samples_per_shard: Samples per shard.

    Use as a context manager: a normal exit writes the last (shorter) sample and ``sizes.json``; an
    exception closes the open shard without adding the buffered tokens.
    """

    def __init__(self, out_dir: str | Path, seq_len: int, blocks_per_sample: int, dtype: np.dtype | str,
                 prefix: str = "text", samples_per_shard: int = 1024) -> None:
        self.packer = BlockPacker(seq_len, blocks_per_sample, dtype)
        self.sink = ShardSink(out_dir, prefix, samples_per_shard)
        self.prefix = prefix
        self.shard_blocks: Counter = Counter()
        self.last_sample_blocks = 0

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.sink.close()

    def add(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append tokens to the stream, writing every sample they complete."""
        for blocks in self.packer.add(tokens):
            self._write(blocks)

    def _write(self, blocks: np.ndarray) -> None:
        self.sink.write(sample_key(self.sink.count), {TOKENS_FIELD: encode_blocks(blocks)})
        self.shard_blocks[next(reversed(self.sink.sizes))] += blocks.shape[0]  # the shard just written to
        self.last_sample_blocks = blocks.shape[0]

    def close(self) -> None:
        """Write the buffered full blocks as the last sample (the partial tail is dropped) and ``sizes.json``."""
        last = self.packer.finish()
        if last is not None:
            self._write(last)
        self.sink.close()

    def summary(self) -> dict[str, Any]:
        """The format and count entries of ``pack_info.json``."""
        p = self.packer
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "field": TOKENS_FIELD,
            "seq_len": p.seq_len, "block_len": p.seq_len + 1, "block_stride": p.seq_len,
            "blocks_per_sample": p.blocks_per_sample, "samples_per_shard": self.sink.samples_per_shard,
            "prefix": self.prefix, "dtype": p.dtype.name, "tokens": p.tokens, "tokens_in_blocks": p.tokens_in_blocks,
            "dropped_tail_tokens": p.dropped_tail_tokens, "blocks": p.blocks, "samples": self.sink.count,
            "last_sample_blocks": self.last_sample_blocks,
            "shards": {name: {"samples": n, "blocks": self.shard_blocks[name]}
                       for name, n in sorted(self.sink.sizes.items())},
        }


def read_pack_info(shard_dir: str | Path) -> dict[str, Any]:
    """Read and check ``pack_info.json`` of a packed text directory.

    Args:
        shard_dir: The directory written by ``pack-text``.

    Returns:
        The pack description (see the module docstring).

    Raises:
        FileNotFoundError: If the directory has no ``pack_info.json``.
        BlockFormatError: If it is not a complete block pack of a supported version, or misses a required key.
    """
    path = Path(shard_dir) / PACK_INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a directory written by `python -m latent_mca pack-text`")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BlockFormatError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise BlockFormatError(f"{path} does not describe a {FORMAT_NAME} pack")
    if info.get("version") != FORMAT_VERSION:
        raise BlockFormatError(f"{path}: format version {info.get('version')} is not supported "
                               f"(this code reads version {FORMAT_VERSION})")
    if info.get("complete") is not True:
        raise BlockFormatError(f"{path}: the pack is incomplete (pack-text was interrupted); run it again with "
                               "--overwrite true")
    missing = [k for k in _REQUIRED_INFO if k not in info]
    if missing:
        raise BlockFormatError(f"{path} misses {missing}")
    return info
