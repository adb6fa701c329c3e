"""``python -m latent_mca shards``: import a dataset into webdataset shards.

The driver reads records (JSON array or JSONL), converts each with the format's pure converter (in worker
processes when ``--num_workers`` > 0, results kept in input order), gives every sample a unique key,
writes it with :class:`~latent_mca.shards.ShardSink`, and counts every skipped record by reason. It always
finishes: bad records are skipped and listed in ``<out>/import_report.json``, never fatal.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from latent_mca.importers import authors, mmrole, pcogalign
from latent_mca.importers.common import (
    MALFORMED,
    Converted,
    ImportContext,
    ImportReport,
    KeyRegistry,
    RecordError,
    Skipped,
    iter_records,
    record_label,
)
from latent_mca.shards import ShardSink, safe_key

Converter = Callable[[str, Any, ImportContext], Converted]

#: Format name -> (converter, the output kinds it may write).
FORMATS: dict[str, tuple[Converter, tuple[str, ...]]] = {
    "authors": (authors.convert, ("paired", "text_only")),
    "mmrole": (mmrole.convert, ("dialogue",)),
    "pcogalign": (pcogalign.convert, ("dialogue",)),
}
REPORT_NAME = "import_report.json"
_CHUNK = 64  # records per worker task: large enough to amortise pickling, small enough to keep order cheap


def shards(
    format: Literal["authors", "mmrole", "pcogalign"],
    input: str,
    out: str,
    images_root: str | None = None,
    split: str = "train",
    samples_per_shard: int = 1000,
    prefix: str | None = None,
    overwrite: bool = False,
    num_workers: int = 0,
    log_first: int = 10,
) -> dict[str, Any]:
    """Import a dataset file into webdataset shards under ``out``.

    ``authors`` writes ``out/paired/`` (records with an image) and ``out/text_only/``; ``mmrole`` and
    ``pcogalign`` write ``out/dialogue/`` with shards named after the split. Each directory gets a
    ``sizes.json``; ``out/import_report.json`` holds the counts and every skipped record with its reason.

    Args:
        format: Input format: ``authors`` (the paper's release: JSON array of {id, images, messages,
            instance_type}), ``mmrole`` (role-play dialogues with character profiles) or ``pcogalign``
            (PCogAlignBench records with a role set and a golden response).
        input: The records: a JSON array file or a JSONL file (one record per line).
        out: Output root directory (created).
        images_root: Directory that the records' relative image paths are resolved against; default: the
            input file's directory.
        split: Split name of dialogue samples (``train``, ``test_id``, ``test_ood``, ...); also their shard
            name prefix.
        samples_per_shard: Samples per tar shard.
        prefix: Shard name prefix; default: the split for dialogue formats, the input file's name (without
            extension) for ``authors``, so several files can be imported into one output.
        overwrite: Replace existing shards with the same prefix instead of refusing to run.
        num_workers: Worker processes that read and check images in parallel (0: in this process).
        log_first: Skipped records logged one line each before the log is rate-limited (all are counted and
            listed in the report either way).

    Returns:
        The import report: ``written`` (per kind), ``skipped`` (per reason), ``duplicate_ids``,
        ``skipped_records`` (id, reason, detail), the shard names per kind, and the arguments used.

    Raises:
        FileNotFoundError: If the input file or the images root does not exist.
        FileExistsError: If shards with this prefix already exist and ``overwrite`` is False.
        ValueError: On an unknown format, an unusable prefix, or an input that is not a JSON array / JSONL.
    """
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    input_path = Path(input)
    if not input_path.is_file():
        raise FileNotFoundError(f"--input {str(input_path)!r}: no such file")
    root = Path(images_root) if images_root is not None else input_path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"--images_root {str(root)!r}: no such directory")
    convert, kinds = FORMATS[format]
    prefix = prefix if prefix is not None else (safe_key(input_path.stem) if format == "authors" else split)
    if safe_key(prefix) != prefix:
        raise ValueError(f"shard prefix {prefix!r} (from --prefix or --split) may only hold letters, digits, "
                         "'_' and '-'")
    out_dir = Path(out)
    for kind in kinds:
        _clear_or_refuse(out_dir / kind, prefix, overwrite)

    report = ImportReport(log_first=log_first)
    registry = KeyRegistry()
    sinks: dict[str, ShardSink] = {}
    ctx = ImportContext(images_root=root, split=split)
    try:
        for item in _convert_all(iter_records(input_path), convert, ctx, num_workers):
            report.records += 1
            if isinstance(item, Skipped):
                report.skip(item)
            else:
                _write(item, registry, report, sinks, out_dir, prefix, samples_per_shard)
    finally:
        for sink in sinks.values():
            sink.close()

    result = {
        "format": format, "input": str(input_path), "images_root": str(root), "out": str(out_dir),
        "split": split, "prefix": prefix, "kinds": list(kinds),
        "shards": {kind: sorted(sink.sizes) for kind, sink in sinks.items()},
        **report.to_dict(),
    }
    _write_report(out_dir, result)
    print(f"{format} import of {input_path} -> {out_dir}: {report.summary()}; report in {out_dir / REPORT_NAME}")
    return result


def _write(item: Converted, registry: KeyRegistry, report: ImportReport, sinks: dict[str, ShardSink],
           out_dir: Path, prefix: str, samples_per_shard: int) -> None:
    """Key and write one converted record's samples, noting a duplicate id."""
    duplicate = registry.is_duplicate(item.source_id)
    keys = []
    for draft in item.drafts:
        key = registry.claim(f"{item.source_id}_{draft.suffix}" if draft.suffix else item.source_id)
        fields: dict[str, Any] = {"json": {"id": key, **draft.meta, "source_id": item.source_id}}
        if draft.image is not None:
            data, extension = draft.image
            fields[extension] = data
        if draft.kind not in sinks:
            sinks[draft.kind] = ShardSink(out_dir / draft.kind, prefix, samples_per_shard)
        sinks[draft.kind].write(key, fields)
        report.written[draft.kind] += 1
        keys.append(key)
    if duplicate:
        report.duplicate(item.source_id, keys[0])


def _convert_one(convert: Converter, ctx: ImportContext, item: tuple[str, Any]) -> Converted | Skipped:
    """Convert one record; every failure becomes a :class:`Skipped` (picklable, so workers can return it)."""
    label, record = item
    if isinstance(record, RecordError):
        return Skipped(label, record.reason, record.detail)
    record_id = record_label(record, label)
    try:
        return convert(label, record, ctx)
    except RecordError as exc:
        return Skipped(record_id, exc.reason, exc.detail)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a shape the checks did not foresee
        return Skipped(record_id, MALFORMED, f"unexpected record shape ({type(exc).__name__}: {exc})")


def _convert_chunk(convert: Converter, ctx: ImportContext, chunk: list[tuple[str, Any]]) -> list[Any]:
    return [_convert_one(convert, ctx, item) for item in chunk]


def _convert_all(records: Iterable[tuple[str, Any]], convert: Converter, ctx: ImportContext,
                 num_workers: int) -> Iterator[Converted | Skipped]:
    """Converted records in input order; with workers, a bounded window of chunks is in flight."""
    if num_workers <= 0:
        for item in records:
            yield _convert_one(convert, ctx, item)
        return
    iterator = iter(records)
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        pending: deque = deque()
        while chunk := list(islice(iterator, _CHUNK)):
            pending.append(pool.submit(_convert_chunk, convert, ctx, chunk))
            if len(pending) >= 2 * num_workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _clear_or_refuse(kind_dir: Path, prefix: str, overwrite: bool) -> None:
    """Refuse to mix a new import with old shards of the same prefix, or remove them when overwriting."""
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    files = sorted(p for p in kind_dir.glob("*.tar") if pattern.match(p.name)) if kind_dir.is_dir() else []
    sizes_path = kind_dir / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
    listed = [name for name in sizes if pattern.match(name)]
    if not files and not listed:
        return
    if not overwrite:
        example = files[0].name if files else listed[0]
        raise FileExistsError(f"{kind_dir} already holds shards named {prefix}-*.tar (e.g. {example}); pass "
                              "--overwrite true to replace them, or --prefix to import beside them")
    for path in files:
        path.unlink()
    if listed:
        sizes_path.write_text(json.dumps({k: v for k, v in sizes.items() if k not in listed}, indent=1))


def _write_report(out_dir: Path, result: dict[str, Any]) -> None:
    """Write this import's report; earlier imports into ``out`` (other prefixes) stay under ``earlier_imports``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_NAME
    earlier: list[dict[str, Any]] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if isinstance(old, dict) and old:
            earlier = old.pop("earlier_imports", []) + [old]
    replaced = set(result["kinds"])
    earlier = [r for r in earlier if not (r.get("prefix") == result["prefix"] and replaced & set(r.get("kinds", [])))]
    path.write_text(json.dumps({**result, "earlier_imports": earlier}, indent=1, ensure_ascii=False))
