"""Pieces shared by the dataset importers: record reading, image checks, message content, keys, reports.

An importer is a pure function ``convert(label, record, ctx) -> Converted`` that either turns one input
record into one or more :class:`Draft` samples or raises :class:`RecordError` with a short reason code.
Being pure (no shared state), it can run in worker processes; the driver in
:mod:`latent_mca.importers.cli` owns the keys, the shard writers and the :class:`ImportReport`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latent_mca.shards import image_extension, safe_key

log = logging.getLogger(__name__)

#: The literal image placeholder of LLaVA-style prompts.
IMAGE_PLACEHOLDER = "<image>"
_PLACEHOLDER_SPLIT = re.compile(r"\s*" + re.escape(IMAGE_PLACEHOLDER) + r"\s*")

# Reason codes (the keys of the report's ``skipped`` counts).
MALFORMED = "malformed_record"
BAD_JSON = "bad_json"
MISSING_IMAGE = "missing_image"
BAD_IMAGE = "bad_image"
UNSUPPORTED_IMAGE = "unsupported_image_format"
MULTIPLE_IMAGES = "multiple_images"
NO_ASSISTANT_TURN = "no_assistant_turn"
UNKNOWN_ROLE = "unknown_role"
MISSING_PROFILE = "missing_profile"


class RecordError(Exception):
    """A record that cannot be imported; it is skipped and counted under ``reason``.

    Args:
        reason: Short reason code (one of this module's constants), the key of the skip counts.
        detail: Human-readable explanation naming the offending key, turn or file.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class ImportContext:
    """What converters need besides the record.

    Args:
        images_root: Directory that relative image paths are resolved against.
        split: Split name written into dialogue samples.
    """

    images_root: Path
    split: str


@dataclass
class Draft:
    """One sample produced by a converter, before it gets its unique key.

    Args:
        kind: Output subdirectory: ``paired``, ``text_only`` or ``dialogue``.
        suffix: Appended to the record's key (``t0``, ``t1`` ... for dialogue turns; empty for one sample).
        meta: The sample's ``json`` field without ``id`` and ``source_id`` (the driver adds them).
        image: ``(original encoded bytes, extension)`` or None.
    """

    kind: str
    suffix: str
    meta: dict[str, Any]
    image: tuple[bytes, str] | None = None


@dataclass
class Converted:
    """A record converted into samples.

    Args:
        source_id: The record's original id (used for the key and kept as ``source_id``).
        drafts: Its samples, in order.
    """

    source_id: str
    drafts: list[Draft]


@dataclass
class Skipped:
    """A record that was skipped: its id (or position label), reason code and explanation."""

    record_id: str
    reason: str
    detail: str


def iter_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(label, record)`` from a JSON array file or a JSONL file (one record per line).

    JSONL is streamed line by line; a JSON array is loaded whole. ``label`` names the record's position
    (``#12`` in an array, ``line 13`` in JSONL) for reports when the record has no usable id. A JSONL line
    that does not parse is yielded as a :class:`RecordError` in place of the record, so it is counted.

    Raises:
        ValueError: If the file is a JSON array that does not parse, or a single JSON object.
    """
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        try:
            records = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        for index, record in enumerate(records):
            yield f"#{index}", record
        return
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if number == 1 and head.startswith("{") and _is_single_object(path):
                    raise ValueError(f"{path}: a single JSON object; expected a JSON array of records "
                                     "or JSONL (one record per line)") from exc
                record = RecordError(BAD_JSON, f"line {number} is not valid JSON ({exc.msg})")
            yield f"line {number}", record


def _is_single_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8-sig")), dict)
    except json.JSONDecodeError:
        return False


def record_label(record: Any, label: str) -> str:
    """The id to report a record under: its ``id`` when it has a scalar one, else its position label."""
    if isinstance(record, dict) and isinstance(record.get("id"), (str, int)) and str(record["id"]):
        return str(record["id"])
    return label


def require(mapping: Any, key: str, types: type | tuple[type, ...], where: str = "record") -> Any:
    """Return ``mapping[key]`` after checking that it exists and has one of ``types``.

    Raises:
        RecordError: ``malformed_record`` naming the key and what was found.
    """
    if not isinstance(mapping, dict):
        raise RecordError(MALFORMED, f"{where} is a {type(mapping).__name__}, expected an object")
    if key not in mapping:
        raise RecordError(MALFORMED, f"{where} has no {key!r}")
    value = mapping[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise RecordError(MALFORMED, f"{where}[{key!r}] is a {type(value).__name__}, expected {names}")
    return value


def source_id_of(record: dict[str, Any], key: str = "id") -> str:
    """The record's id as a non-empty string.

    Raises:
        RecordError: If the id is missing, not a string/int, or empty.
    """
    value = str(require(record, key, (str, int)))
    if not value.strip():
        raise RecordError(MALFORMED, f"record[{key!r}] is empty")
    return value


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    # Another module may have set PIL's process-wide LOAD_TRUNCATED_IMAGES; a truncated file must still fail.
    from PIL import ImageFile

    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def read_image(images_root: Path, relative: str) -> tuple[bytes, str]:
    """Read an image file's original bytes and check that they decode completely.

    The bytes are returned unchanged (never re-encoded). The check is PIL's ``verify()`` (structure and
    checksums) followed by a full ``load()`` on a fresh handle (catches truncated pixel data).

    Args:
        images_root: Directory the relative path is resolved against (absolute paths are used as they are).
        relative: The record's image path.

    Returns:
        ``(bytes, extension)`` with extension ``jpg``, ``png`` or ``webp``.

    Raises:
        RecordError: ``missing_image``, ``bad_image`` or ``unsupported_image_format``, naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = images_root / relative
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordError(MISSING_IMAGE, f"image {str(path)!r} does not exist") from None
    except OSError as exc:
        raise RecordError(MISSING_IMAGE, f"image {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    try:
        with _strict_truncation():
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                image_format = image.format
    except UnidentifiedImageError:
        raise RecordError(BAD_IMAGE, f"image {str(path)!r} is not an image PIL can identify") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise RecordError(BAD_IMAGE, f"image {str(path)!r} does not decode ({type(exc).__name__}: {exc})") from None
    try:
        extension = image_extension(data)
    except ValueError:
        raise RecordError(UNSUPPORTED_IMAGE, f"image {str(path)!r} is a {image_format} image; shards hold JPEG, "
                                             "PNG or WebP bytes as they are (convert it beforehand)") from None
    return data, extension


def image_content(text: str) -> list[dict[str, Any]]:
    """Structured content for a user turn that carries the image.

    The image item goes where the ``<image>`` placeholder was (the placeholder and the whitespace around it
    are removed), or first when the text has no placeholder. Empty text pieces are dropped.

    Args:
        text: The turn's text, with at most one placeholder.

    Returns:
        Hugging Face content items, e.g. ``[{"type": "image"}, {"type": "text", "text": "..."}]``.
    """
    if IMAGE_PLACEHOLDER not in text:
        return [{"type": "image"}] + ([{"type": "text", "text": text}] if text.strip() else [])
    content: list[dict[str, Any]] = []
    for i, piece in enumerate(_PLACEHOLDER_SPLIT.split(text)):
        if i > 0:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return content


def count_placeholders(text: str) -> int:
    """Number of ``<image>`` placeholders in a text."""
    return text.count(IMAGE_PLACEHOLDER)


def strip_placeholders(text: str) -> str:
    """The text with every ``<image>`` placeholder (and its surrounding whitespace) replaced by one space."""
    return _PLACEHOLDER_SPLIT.sub(" ", text).strip()


class KeyRegistry:
    """Unique sample keys and duplicate-id detection for one import (bug B8: colliding ids overwrite)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._keys: set[str] = set()

    def is_duplicate(self, source_id: str) -> bool:
        """Record ``source_id`` as seen; True if it was seen before."""
        seen = source_id in self._ids
        self._ids.add(source_id)
        return seen

    def claim(self, candidate: str) -> str:
        """Return ``candidate`` (made key-safe), with ``_dupN`` appended if that key is already taken."""
        base = safe_key(candidate)
        key, n = base, 0
        while key in self._keys:
            n += 1
            key = f"{base}_dup{n}"
        self._keys.add(key)
        return key


@dataclass
class ImportReport:
    """Counts of what an import wrote and skipped, with every skipped record's id and reason.

    Args:
        log_first: Skips logged one line each before the log is rate-limited (then one line per power of
            ten); every skip is still counted and listed.
    """

    log_first: int = 10
    records: int = 0
    written: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    skipped_records: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[dict[str, str]] = field(default_factory=list)

    def skip(self, item: Skipped) -> None:
        """Count and list a skipped record, logging it within the rate limit."""
        self.skipped[item.reason] += 1
        self.skipped_records.append({"id": item.record_id, "reason": item.reason, "detail": item.detail})
        total = len(self.skipped_records)
        if total <= self.log_first:
            log.warning("skipped record %s (%s): %s", item.record_id, item.reason, item.detail)
        elif _is_power_of_ten(total):
            log.warning("%d records skipped so far; only the first %d are logged one by one, "
                        "import_report.json lists them all", total, self.log_first)

    def duplicate(self, source_id: str, key: str) -> None:
        """Note a record whose id an earlier record already had; it was kept under ``key``."""
        self.duplicates.append({"id": source_id, "key": key})
        if len(self.duplicates) <= self.log_first:
            log.warning("duplicate record id %r: kept both, the later one under key %r", source_id, key)

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return {
            "records": self.records,
            "written": dict(self.written),
            "written_total": sum(self.written.values()),
            "skipped": dict(self.skipped),
            "skipped_total": sum(self.skipped.values()),
            "duplicate_ids": len(self.duplicates),
            "skipped_records": list(self.skipped_records),
            "duplicate_records": list(self.duplicates),
        }

    def summary(self) -> str:
        """One line for the terminal."""
        written = ", ".join(f"{k} {v}" for k, v in sorted(self.written.items())) or "nothing"
        line = f"{self.records} records: wrote {written}; skipped {sum(self.skipped.values())}"
        if self.skipped:
            line += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) + ")"
        if self.duplicates:
            line += f"; {len(self.duplicates)} duplicate ids kept with a key suffix"
        return line


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1
