"""Reading documents for ``pack-text``: text-only shards, JSONL and plain-text files, streamed.

Each reader yields :class:`Document` (a location and either plain text or chat messages) or :class:`Skip`
(a location and a reason) so that nothing unreadable is lost silently: the packer counts and lists skips.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

SUFFIXES = (".tar", ".jsonl", ".txt")
# Skip reasons (the keys of pack_info.json's "skipped").
BAD_JSON = "bad_json"
BAD_ENCODING = "bad_encoding"
NO_TEXT = "no_text"
BAD_MESSAGES = "bad_messages"
BAD_SHARD = "unreadable_shard"


@dataclass(frozen=True)
class Document:
    """One input document: ``kind`` is ``text`` (a string) or ``messages`` (a conversation)."""

    where: str
    kind: str
    content: Any


@dataclass(frozen=True)
class Skip:
    """An input item that was skipped: its location, reason code and explanation."""

    where: str
    reason: str
    detail: str


def resolve_inputs(patterns: Sequence[str]) -> list[Path]:
    """Expand input paths, directories and globs into the ordered list of files to read.

    Raises:
        FileNotFoundError: If a path does not exist, or a glob or directory yields no input file.
        ValueError: If a file has an unsupported extension or is listed twice.
    """
    files: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
            found = [p for p in matches if p.is_file() and p.suffix in SUFFIXES]
        elif Path(pattern).is_dir():
            found = sorted(p for p in Path(pattern).iterdir() if p.is_file() and p.suffix in SUFFIXES)
        elif Path(pattern).is_file():
            found = [Path(pattern)]
            if found[0].suffix not in SUFFIXES:
                raise ValueError(f"--input {pattern!r}: unsupported file type; expected {', '.join(SUFFIXES)}")
        else:
            raise FileNotFoundError(f"--input {pattern!r}: no such file or directory")
        if not found:
            raise FileNotFoundError(f"--input {pattern!r}: matches no {'/'.join(SUFFIXES)} file")
        files += found
    seen: set[Path] = set()
    for path in files:
        if path.resolve() in seen:
            raise ValueError(f"--input: {str(path)!r} is listed twice")
        seen.add(path.resolve())
    return files


def _messages_problem(messages: Any) -> str | None:
    """Why ``messages`` is not a conversation the chat template can render, or None."""
    if not isinstance(messages, list) or not messages:
        return f"'messages' is a {type(messages).__name__}{' (empty)' if messages == [] else ''}, " \
               "expected a non-empty list"
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            return f"messages[{i}] is not an object with a string 'role'"
        if not isinstance(turn.get("content"), (str, list)):
            return f"messages[{i}]['content'] is a {type(turn.get('content')).__name__}, expected a string or list"
    return None


def record_document(where: str, record: Any) -> Document | Skip:
    """Turn one parsed JSON record into a document, or a skip with its reason."""
    if not isinstance(record, dict):
        return Skip(where, NO_TEXT, f"a JSON {type(record).__name__}, expected an object with 'messages' or 'text'")
    if "messages" in record:
        problem = _messages_problem(record["messages"])
        return Skip(where, BAD_MESSAGES, problem) if problem else Document(where, "messages", record["messages"])
    text = record.get("text")
    if isinstance(text, str) and text.strip():
        return Document(where, "text", text)
    return Skip(where, NO_TEXT, "no 'messages' list and no non-empty 'text' string")


def _jsonl_documents(path: Path) -> Iterator[Document | Skip]:
    with open(path, "rb") as f:  # bytes: one badly encoded line is skipped, not fatal to the whole file
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                yield Skip(where, BAD_JSON, f"not valid JSON ({exc})")
                continue
            yield record_document(where, record)


def _txt_documents(path: Path, per: str) -> Iterator[Document | Skip]:
    lines: list[bytes] = []
    start = 0
    with open(path, "rb") as f:
        # a final empty line closes the last paragraph
        for number, line in enumerate(chain(f, [b""]), start=1):
            if line.strip():
                start = start or number
                lines.append(line)
                if per == "paragraph":
                    continue
            if lines:
                try:
                    text = b"".join(lines).decode("utf-8").rstrip("\r\n")
                    yield Document(f"{path}:{start}", "text", text)
                except UnicodeDecodeError as exc:
                    yield Skip(f"{path}:{start}", BAD_ENCODING, f"not UTF-8 ({exc})")
            lines, start = [], 0


def _tar_documents(path: Path) -> Iterator[Document | Skip]:
    from webdataset.tariterators import tarfile_samples

    errors: list[Exception] = []

    def stop(exc: Exception) -> bool:  # keep what was read, report the rest as lost
        errors.append(exc)
        return False

    for sample in tarfile_samples([{"url": str(path)}], handler=stop):
        where = f"{path}:{sample['__key__']}"
        if "json" in sample:
            try:
                record = json.loads(sample["json"])
            except ValueError as exc:
                yield Skip(where, BAD_JSON, f"json is not valid JSON ({exc})")
                continue
            yield record_document(where, record)
        elif "txt" in sample:
            try:
                text = sample["txt"].decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Skip(where, BAD_ENCODING, f"txt is not UTF-8 ({exc})")
                continue
            yield Document(where, "text", text) if text.strip() else Skip(where, NO_TEXT, "empty txt")
        else:
            yield Skip(where, NO_TEXT, f"no json or txt file (has {sorted(k for k in sample if k[0] != '_')})")
    for exc in errors:
        yield Skip(str(path), BAD_SHARD, f"the shard could not be read to the end; the samples after the last "
                                         f"one listed were lost ({type(exc).__name__}: {exc})")


def iter_documents(files: Iterable[Path], txt_documents: str = "paragraph") -> Iterator[Document | Skip]:
    """Stream the documents (and skips) of the input files in order."""
    for path in files:
        if path.suffix == ".tar":
            yield from _tar_documents(path)
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path)
        else:
            yield from _txt_documents(path, txt_documents)
