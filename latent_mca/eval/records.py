"""Evaluation records (one JSON line per split, sample key and generation) and results tables.

A record holds one generated reply with its reference and its judge scores (or None with the reason the
judgement is missing). Its id is built from ``(split, key, generation)`` and must be unique within a file:
the authors keyed results by a dialogue id or an image path, which several samples can share, and colliding
samples silently overwrote each other's scores (bug B8). Here a duplicate id raises before anything is written.

The JSON line of a record is::

    {"id": "ood|mmrole/dlg_3/turn_2|0", "split": "ood", "key": "mmrole/dlg_3/turn_2", "generation": 0,
     "reply": "...", "reference": "...", "scores": {"Fluency": [8, 9], ...} | null,
     "score_error": null | "judge reply had 7 score pairs, expected 8", "metadata": {...}}

``scores`` maps each aspect, in the judge's order, to ``[score of the reply, score of the reference]``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from latent_mca.rl.rewards.base import PairScores

_FIELDS = ("split", "key", "generation", "reply", "reference", "scores", "score_error", "metadata")


class DuplicateRecordError(ValueError):
    """Two evaluation records share an id (the same split, sample key and generation index)."""


def record_id(split: str, key: str, generation: int) -> str:
    """The unique id ``"{split}|{key}|{generation}"`` (unambiguous because a split name has no ``|``)."""
    if not isinstance(split, str) or not split or "|" in split:
        raise ValueError(f"split name {split!r} must be non-empty and must not contain '|'")
    return f"{split}|{key}|{generation}"


@dataclass
class EvalRecord:
    """One generated reply of one sample, with its judgement.

    Attributes:
        split: Evaluation split (e.g. ``"id"``, ``"ood"``).
        key: Unique sample key within the split (for multi-turn dialogues it must identify the turn).
        generation: Generation index ``g`` in ``0 .. N-1``.
        reply: The generated reply.
        reference: The ground-truth reply.
        scores: The judge's scores, or None.
        score_error: Why ``scores`` is None (required then; must be None when scores exist).
        metadata: Anything else worth keeping (checkpoint, decoding settings, latent codes, ...).
    """

    split: str
    key: str
    generation: int
    reply: str
    reference: str
    scores: PairScores | None = None
    score_error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate the id parts and that a missing judgement comes with its reason."""
        record_id(self.split, self.key, self.generation)
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"record in split {self.split!r} has an empty or non-string key {self.key!r}")
        if isinstance(self.generation, bool) or not isinstance(self.generation, int) or self.generation < 0:
            raise ValueError(f"record {self.split}/{self.key}: generation must be an int >= 0, "
                             f"got {self.generation!r}")
        if (self.scores is None) == (self.score_error is None):
            raise ValueError(f"record {self.id}: give either scores or score_error (the reason scores are "
                             "missing), not both and not neither")

    @property
    def id(self) -> str:
        """The unique record id."""
        return record_id(self.split, self.key, self.generation)

    def to_json(self) -> dict[str, Any]:
        """The JSON-serialisable dict written as one line."""
        scores = None
        if self.scores is not None:
            if len(set(self.scores.aspects)) != len(self.scores.aspects):
                raise ValueError(f"record {self.id}: aspect names repeat: {self.scores.aspects}")
            scores = {name: [a, b] for name, a, b in zip(self.scores.aspects, self.scores.a, self.scores.b)}
        return {"id": self.id, "split": self.split, "key": self.key, "generation": self.generation,
                "reply": self.reply, "reference": self.reference, "scores": scores,
                "score_error": self.score_error, "metadata": self.metadata}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = "record") -> EvalRecord:
        """Rebuild a record from :meth:`to_json` output.

        Args:
            obj: The parsed JSON object.
            where: Location for error messages (e.g. ``"file.jsonl:12"``).

        Raises:
            ValueError: If a field is missing, the scores are malformed or the stored id disagrees.
        """
        missing = [f for f in _FIELDS if f not in obj]
        if missing:
            raise ValueError(f"{where}: evaluation record lacks fields {missing}")
        if not isinstance(obj["metadata"], (dict, type(None))):
            raise ValueError(f"{where}: metadata must be an object, got {type(obj['metadata']).__name__}")
        pair = _parse_scores(obj["scores"], where)
        try:
            record = cls(split=obj["split"], key=obj["key"], generation=obj["generation"], reply=obj["reply"],
                         reference=obj["reference"], scores=pair, score_error=obj["score_error"],
                         metadata=dict(obj["metadata"] or {}))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        if "id" in obj and obj["id"] != record.id:
            raise ValueError(f"{where}: stored id {obj['id']!r} does not match its fields ({record.id!r})")
        return record


def _parse_scores(scores: Any, where: str) -> PairScores | None:
    """Turn the JSON ``{aspect: [a, b]}`` mapping back into :class:`PairScores`."""
    if scores is None:
        return None
    if not isinstance(scores, dict):
        raise ValueError(f"{where}: scores must be an object mapping aspect -> [a, b], got "
                         f"{type(scores).__name__}")
    bad = [n for n, v in scores.items()
           if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, numbers.Real) for x in v))]
    if not scores or bad:
        raise ValueError(f"{where}: scores must map aspect -> [a, b] numbers; bad or no entries: {bad}")
    return PairScores(tuple(scores), tuple(v[0] for v in scores.values()), tuple(v[1] for v in scores.values()))


def _dumps(record: EvalRecord) -> str:
    try:
        return json.dumps(record.to_json(), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"record {record.id} cannot be written as strict JSON: {err}") from err


def check_unique(records: Iterable[EvalRecord], seen: set[str] | None = None) -> set[str]:
    """Raise :class:`DuplicateRecordError` on the first repeated id; return all ids (plus ``seen``)."""
    ids = set() if seen is None else set(seen)
    for record in records:
        if record.id in ids:
            raise DuplicateRecordError(
                f"evaluation record id {record.id!r} appears twice: every (split, key, generation) must be "
                "unique; a shared key (dialogue id, image path) must be extended, e.g. with the turn index"
            )
        ids.add(record.id)
    return ids


def write_records(path: str | Path, records: Sequence[EvalRecord], append: bool = False) -> Path:
    """Write records as JSON lines, refusing duplicate ids.

    All records are checked (against each other and, with ``append``, against the records already in the
    file) before the file is touched; a new file is written to a temporary name and renamed into place.

    Args:
        path: The ``.jsonl`` file.
        records: The records.
        append: Add to an existing file instead of replacing it.

    Returns:
        The path.

    Raises:
        DuplicateRecordError: If two records (or a record and one already in the file) share an id.
    """
    path = Path(path)
    existing = {r.id for r in read_records(path)} if append and path.exists() else set()
    check_unique(records, existing)
    lines = "".join(_dumps(r) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    if append:
        with path.open("a", encoding="utf-8") as f:
            f.write(lines)
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(lines, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_records(path: str | Path) -> list[EvalRecord]:
    """Read a records file written by :func:`write_records`.

    Raises:
        ValueError: On a line that is not valid JSON or not a valid record (the message names file and line).
        DuplicateRecordError: If the file holds two records with the same id.
    """
    path = Path(path)
    records: list[EvalRecord] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            records.append(EvalRecord.from_json(obj, where))
    try:
        check_unique(records)
    except DuplicateRecordError as err:
        raise DuplicateRecordError(f"{path}: {err}") from err
    return records


def scores_by_split(records: Iterable[EvalRecord]) -> dict[str, dict[tuple[str, int], PairScores | None]]:
    """Judgements per split keyed by ``(key, generation)``: the input of :func:`judge_score_ratio`."""
    out: dict[str, dict[tuple[str, int], PairScores | None]] = {}
    records = list(records)
    check_unique(records)
    for r in records:
        out.setdefault(r.split, {})[(r.key, r.generation)] = r.scores
    return out


def replies_by_split(records: Iterable[EvalRecord]) -> dict[str, dict[str, list[str]]]:
    """Replies per split and sample key, in generation order: the input of :func:`diversity_report`."""
    grouped: dict[str, dict[str, list[tuple[int, str]]]] = {}
    records = list(records)
    check_unique(records)
    for r in records:
        grouped.setdefault(r.split, {}).setdefault(r.key, []).append((r.generation, r.reply))
    return {s: {k: [t for _, t in sorted(v)] for k, v in keys.items()} for s, keys in grouped.items()}


def fmt_mean_std(mean: float, std: float, digits: int = 3, scale: float = 1.0) -> str:
    """Format ``mean ± std`` for a results table.

    Args:
        mean: The mean (NaN or None prints ``n/a``).
        std: The standard deviation (NaN or None prints ``± n/a``, e.g. a single generation).
        digits: Digits after the decimal point.
        scale: Factor applied to both (100 turns the score ratio into the paper's "95.3" style).

    Returns:
        E.g. ``"0.953 ± 0.012"``.
    """
    def fmt(x: float | None) -> str:
        return "n/a" if x is None or math.isnan(x) else f"{x * scale:.{digits}f}"

    return "n/a" if mean is None or math.isnan(mean) else f"{fmt(mean)} ± {fmt(std)}"


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | Mapping[str, str],
                   digits: int = 3) -> str:
    """A Markdown table with padded, aligned columns (numeric columns right-aligned).

    Args:
        rows: One mapping per table row.
        columns: Keys to show, in order; a mapping gives ``key -> header`` instead of using the key as header.
        digits: Digits after the decimal point for float cells.

    Returns:
        The table, one line per row plus header and alignment lines, ending with a newline. A missing or None
        value prints ``-``; NaN prints ``n/a``.
    """
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    if not headers:
        raise ValueError("markdown_table needs at least one column")
    keys = list(headers)
    cells = [[_cell(row.get(k), digits) for k in keys] for row in rows]
    numeric = [bool(rows) and all(isinstance(row.get(k), numbers.Real) or row.get(k) is None for row in rows)
               for k in keys]
    widths = [max([len(headers[k]), 3] + [len(r[i]) for r in cells]) for i, k in enumerate(keys)]

    def line(parts: list[str]) -> str:
        return "| " + " | ".join(p.rjust(w) if num else p.ljust(w)
                                 for p, w, num in zip(parts, widths, numeric)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric)) + " |"
    return "\n".join([line([headers[k] for k in keys]), rule] + [line(r) for r in cells]) + "\n"
