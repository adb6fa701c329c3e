"""Tiny webdataset shards for data-module tests: PNG + JSON samples, uneven shard sizes, injected damage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset as wds
from PIL import Image

from latent_mca.shards import write_sizes

IMAGE_SIZE = 4


def png_bytes(value: int, size: int = IMAGE_SIZE) -> bytes:
    """A small PNG whose red channel encodes ``value`` (mod 256)."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, 7, 9)).save(buf, format="PNG")
    return buf.getvalue()


def shard_name(prefix: str, index: int) -> str:
    """File name of shard ``index``."""
    return f"{prefix}-{index:06d}.tar"


def write_shards(directory: str | Path, sizes: list[int], prefix: str = "train",
                 damage: dict[str, dict[str, bytes]] | None = None) -> list[str]:
    """Write one shard per entry of ``sizes`` (that many samples each) and ``sizes.json``.

    Args:
        directory: Output directory (created).
        sizes: Samples per shard.
        prefix: Shard and key prefix.
        damage: Key -> extension -> bytes that replace the sample's file (e.g. a corrupt PNG).

    Returns:
        The keys written, in order. Key ``{prefix}_{shard}_{index}``; JSON ``{"id": key, "value": n}``
        with ``n`` the running sample number.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    damage = damage or {}
    keys, counts, n = [], {}, 0
    for shard, size in enumerate(sizes):
        name = shard_name(prefix, shard)
        with wds.TarWriter(str(directory / name)) as sink:
            for i in range(size):
                key = f"{prefix}_{shard:03d}_{i:03d}"
                fields = {"png": png_bytes(n), "json": json.dumps({"id": key, "value": n}).encode()}
                fields.update(damage.get(key, {}))
                sink.write({"__key__": key, **fields})
                keys.append(key)
                n += 1
        counts[name] = size
    write_sizes(directory, counts)
    return keys


def truncate(path: str | Path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its length (a truncated tar)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
