"""Writing webdataset shards: one writer for the synthetic world, the importers and the text packer.

Shard schema (see docs/data.md): one sample = files sharing a ``__key__`` (no dots); ``json`` holds the
conversation and metadata; images are stored as their original encoded bytes (``jpg``/``png``/``webp``),
never re-encoded. ``sizes.json`` beside the shards maps each shard's file name to its sample count.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def safe_key(raw: str) -> str:
    """Turn an arbitrary record id into a webdataset key (letters, digits, ``_`` and ``-`` only)."""
    key = re.sub(r"[^A-Za-z0-9_\-]+", "_", str(raw)).strip("_")
    return key or "sample"


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes, from their magic number.

    Raises:
        ValueError: If the bytes are not a JPEG, PNG or WebP image.
    """
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError("not a JPEG, PNG or WebP image")


def encode_png(image: Any) -> bytes:
    """Losslessly encode a PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class ShardSink:
    """Write samples into numbered tar shards and ``sizes.json``.

    Args:
        out_dir: Directory for the shards (created).
        prefix: Shard file name prefix: shards are ``{prefix}-000000.tar``, ``{prefix}-000001.tar``, ...
        samples_per_shard: Samples per shard.
        mtime: Modification time written into every tar header; a fixed value makes equal samples give
            byte-identical shards (None: the current time).

    Use as a context manager; ``sizes.json`` is merged with any existing one, so several prefixes
    (``train``, ``test_id``, ...) can share a directory.
    """

    def __init__(self, out_dir: str | Path, prefix: str, samples_per_shard: int = 1000,
                 mtime: float | None = None) -> None:
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.mtime = mtime
        self.sizes: dict[str, int] = {}
        self._writer: Any = None
        self._name: str | None = None
        self._count = 0
        self._keys: set[str] = set()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_next(self) -> None:
        import webdataset as wds

        self._close_current()
        self._name = f"{self.prefix}-{len(self.sizes):06d}.tar"
        self._writer = wds.TarWriter(str(self.out_dir / self._name), mtime=self.mtime)
        self.sizes[self._name] = 0

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write(self, key: str, fields: dict[str, Any]) -> None:
        """Write one sample.

        Args:
            key: Sample key (unique within the sink, no dots).
            fields: Extension -> value: ``json`` (dict), image extensions (bytes), ``txt`` (str), ``npy``...

        Raises:
            ValueError: On an invalid or duplicate key.
        """
        if not _KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} may only hold letters, digits, '_' and '-'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.prefix}")
        self._keys.add(key)
        if self._writer is None or self.sizes[self._name] >= self.samples_per_shard:
            self._open_next()
        sample = {"__key__": key}
        for ext, value in fields.items():
            sample[ext] = json.dumps(value, ensure_ascii=False).encode("utf-8") if ext == "json" else value
        self._writer.write(sample)
        self.sizes[self._name] += 1
        self._count += 1

    @property
    def count(self) -> int:
        """Samples written so far."""
        return self._count

    def close(self) -> None:
        """Close the last shard and merge this sink's counts into ``sizes.json``."""
        self._close_current()
        write_sizes(self.out_dir, self.sizes)


def write_sizes(out_dir: str | Path, sizes: dict[str, int]) -> None:
    """Merge ``sizes`` into ``out_dir/sizes.json``."""
    path = Path(out_dir) / "sizes.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(sizes)
    path.write_text(json.dumps(dict(sorted(merged.items())), indent=1))


def read_sizes(shard_dir: str | Path) -> dict[str, int]:
    """Read ``sizes.json`` (shard file name -> sample count) from a shard directory.

    Raises:
        FileNotFoundError: If the directory has no ``sizes.json``.
    """
    path = Path(shard_dir) / "sizes.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: every shard directory needs a sizes.json")
    return json.loads(path.read_text())
