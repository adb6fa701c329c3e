"""``python -m latent_mca pack-text``: tokenise text-only corpora offline and pack them into token blocks.

Inputs, read as streams (a corpus is never held in memory whole), in the order given (globs sorted):

- ``*.tar``: our text-only shards; each sample's ``json`` holds ``{"messages": [...]}`` (or ``"text"``),
  or the sample has a ``txt`` file. Location in reports: ``shard.tar:key``.
- ``*.jsonl``: one JSON object per line with a ``messages`` list or a ``text`` string (``messages`` wins
  when both are present). Location: ``file.jsonl:line``.
- ``*.txt``: plain text. By default (``--txt_documents paragraph``) a document is a run of lines between
  blank lines (the internal newlines are kept), so multi-line documents work; ``--txt_documents line``
  makes every non-blank line a document. Location: ``file.txt:first line``.
- A directory stands for its ``.tar``, ``.jsonl`` and ``.txt`` files (not recursive, sorted).

Conversations are rendered with the backbone processor's chat template; plain text is used as it is (a
special-token string inside it, like ``<|endoftext|>``, is tokenised literally unless
``--special_tokens_in_text``). Both are tokenised in batches with the fast tokenizer (``add_special_tokens``
off by default: chat templates hold their own), and every document is followed by the end-of-document token
(the tokenizer's EOS unless ``--eos_token`` names another, e.g. ``<|endoftext|>``). Packing and the shard
format are described in :mod:`latent_mca.token_blocks`. Bad inputs (an unparsable line, a sample without
text, malformed messages, an unreadable shard) are skipped, counted by reason in ``pack_info.json`` and
listed with their location in ``pack_skipped.jsonl``. The output depends only on the inputs and options
(also with ``--num_workers``: batches are put back in input order).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np

from latent_mca.importers.text_sources import (
    BAD_MESSAGES,
    Document,
    Skip,
    iter_documents,
    resolve_inputs,
)
from latent_mca.shards import safe_key
from latent_mca.token_blocks import PACK_INFO_NAME, SKIPPED_NAME, BlockWriter, block_dtype

log = logging.getLogger(__name__)


class Encoder:
    """Render and tokenise batches of documents; each document becomes its ids followed by the EOS id.

    Args:
        processor: The backbone's processor (or a bare tokenizer); its chat template renders conversations.
        eos_token_id: End-of-document id appended after every document.
        add_special_tokens: Let the tokenizer add its own special tokens (e.g. BOS) to every document.
        special_tokens_in_text: Parse special-token strings written in plain text as special tokens. Off by
            default: plain text is taken literally, so a stray ``<|endoftext|>`` in web text cannot forge a
            document boundary. Rendered conversations always keep their template's special tokens.
    """

    def __init__(self, processor: Any, eos_token_id: int, add_special_tokens: bool = False,
                 special_tokens_in_text: bool = False) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.eos_token_id = eos_token_id
        self.add_special_tokens = add_special_tokens
        self.special_tokens_in_text = special_tokens_in_text

    def __call__(self, items: list[Document | Skip]) -> list[np.ndarray | Skip]:
        """Token ids (int64, EOS last) for each document; skips pass through in place."""
        results: list[np.ndarray | Skip] = list(items)
        groups: dict[bool, tuple[list[str], list[int]]] = {False: ([], []), True: ([], [])}  # literal? -> texts
        for i, item in enumerate(items):
            if isinstance(item, Skip):
                continue
            if item.kind == "messages":
                try:
                    text = self.processor.apply_chat_template(item.content, tokenize=False)
                except Exception as exc:  # Jinja templates raise anything (TemplateError, TypeError, KeyError...)
                    results[i] = Skip(item.where, BAD_MESSAGES, f"chat template failed ({type(exc).__name__}: {exc})")
                    continue
                literal = False
            else:
                text, literal = item.content, not self.special_tokens_in_text
            groups[literal][0].append(text)
            groups[literal][1].append(i)
        for literal, (texts, slots) in groups.items():
            if not texts:
                continue
            encoded = self.tokenizer(texts, add_special_tokens=self.add_special_tokens, split_special_tokens=literal,
                                     return_attention_mask=False, verbose=False)["input_ids"]
            for i, ids in zip(slots, encoded):
                results[i] = np.asarray([*ids, self.eos_token_id], dtype=np.int64)
        return results


_WORKER_ENCODER: Encoder | None = None


def _init_worker(tokenizer: str, trust_remote_code: bool, *encoder_args: Any) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    from latent_mca.models.backbone import load_processor

    _WORKER_ENCODER = Encoder(load_processor(tokenizer, trust_remote_code=trust_remote_code), *encoder_args)


def _encode_in_worker(items: list[Document | Skip]) -> list[np.ndarray | Skip]:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(items)


def encode_stream(items: Iterable[Document | Skip], encoder: Encoder, batch_size: int, num_workers: int = 0,
                  worker_args: tuple[Any, ...] = ()) -> Iterator[list[np.ndarray | Skip]]:
    """Encoded batches in input order; with workers, a bounded window of batches is in flight.

    Args:
        items: Documents and skips.
        encoder: Used in this process when ``num_workers`` is 0.
        batch_size: Documents per batch.
        num_workers: Worker processes (0: tokenise in this process).
        worker_args: ``(tokenizer path, trust_remote_code, *Encoder arguments after the processor)`` with
            which every worker builds its own encoder.
    """
    iterator = iter(items)
    batches = iter(lambda: list(islice(iterator, batch_size)), [])
    if num_workers <= 0:
        yield from map(encoder, batches)
        return
    with ProcessPoolExecutor(num_workers, initializer=_init_worker, initargs=worker_args) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class SkipLog:
    """Counts skips by reason and lists each in ``pack_skipped.jsonl`` (streamed; memory stays flat).

    Args:
        path: The list's path (created at the first skip).
        log_first: Skips logged one line each before logging is limited to powers of ten.
    """

    def __init__(self, path: Path, log_first: int = 10) -> None:
        self.path = path
        self.log_first = log_first
        self.counts: Counter = Counter()
        self._file: Any = None

    def add(self, skip: Skip) -> None:
        """Count, list and (within the rate limit) log one skip."""
        self.counts[skip.reason] += 1
        if self._file is None:
            self._file = open(self.path, "w", encoding="utf-8")
        self._file.write(json.dumps({"where": skip.where, "reason": skip.reason, "detail": skip.detail},
                                    ensure_ascii=False) + "\n")
        total = sum(self.counts.values())
        if total <= self.log_first:
            log.warning("skipped %s (%s): %s", skip.where, skip.reason, skip.detail)
        elif str(total).rstrip("0") == "1":
            log.warning("%d inputs skipped so far; %s lists them all", total, self.path)

    def close(self) -> None:
        """Close the list."""
        if self._file is not None:
            self._file.close()
            self._file = None


def pack_text(
    input: list[str] | str,
    tokenizer: str,
    out: str,
    seq_len: int = 2048,
    blocks_per_sample: int = 64,
    samples_per_shard: int = 1024,
    prefix: str = "text",
    txt_documents: Literal["paragraph", "line"] = "paragraph",
    eos_token: str | None = None,
    add_special_tokens: bool = False,
    special_tokens_in_text: bool = False,
    batch_size: int = 1000,
    num_workers: int = 0,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    log_first: int = 10,
) -> dict[str, Any]:
    """Tokenise text-only corpora and pack them into ``seq_len + 1`` token blocks in webdataset shards.

    The defaults (2048-token blocks, 64 per sample, 1024 samples per shard) give shards of about 270 MB
    with a vocabulary of up to 65535 tokens. See :mod:`latent_mca.token_blocks` for the format.

    Args:
        input: Input files, directories or globs (``.tar`` text-only shards, ``.jsonl`` with ``messages``
            or ``text``, ``.txt``); read in the order given, glob matches sorted. Several: repeat
            ``--input+ PATH`` or pass a list, ``--input '[a.jsonl, "shards/*.tar"]'``.
        tokenizer: Backbone (or processor / tokenizer) directory, loaded with ``load_processor``.
        out: Output directory (created); holds the shards, ``sizes.json``, ``pack_info.json`` and, if
            anything was skipped, ``pack_skipped.jsonl``.
        seq_len: Sequence length; blocks hold ``seq_len + 1`` tokens (inputs and shifted targets).
        blocks_per_sample: Blocks per webdataset sample (the last sample may hold fewer).
        samples_per_shard: Samples per tar shard.
        prefix: Shard name prefix (``{prefix}-000000.tar``).
        txt_documents: How ``.txt`` files split into documents: ``paragraph`` (blank-line separated) or
            ``line`` (one per line).
        eos_token: End-of-document token appended after every document; default: the tokenizer's EOS.
        add_special_tokens: Let the tokenizer add its special tokens (e.g. BOS) to every document.
        special_tokens_in_text: Parse special-token strings written in plain text (``<|im_end|>`` ...) as
            special tokens; by default plain text is tokenised literally.
        batch_size: Documents tokenised per batch.
        num_workers: Worker processes that render and tokenise (0: in this process); the output is the same.
        overwrite: Replace an earlier pack in ``out`` instead of refusing to run.
        trust_remote_code: Forwarded to ``load_processor``.
        log_first: Skips logged one line each (all are counted and listed either way).

    Returns:
        The contents of ``pack_info.json``.

    Raises:
        FileNotFoundError: If an input path does not exist or matches nothing.
        FileExistsError: If ``out`` already holds shards and ``overwrite`` is false.
        ValueError: On invalid sizes, a prefix that is not key-safe, or an unknown ``eos_token``.
    """
    from latent_mca.models.backbone import load_processor

    for name, value in (("seq_len", seq_len), ("blocks_per_sample", blocks_per_sample),
                        ("samples_per_shard", samples_per_shard), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if safe_key(prefix) != prefix:
        raise ValueError(f"--prefix {prefix!r} may only hold letters, digits, '_' and '-'")
    files = resolve_inputs([input] if isinstance(input, str) else input)
    out_dir = Path(out)
    _prepare_out(out_dir, files, overwrite)
    processor = load_processor(tokenizer, trust_remote_code=trust_remote_code)
    tok = getattr(processor, "tokenizer", processor)
    eos_id, eos_name = _eos(tok, tokenizer, eos_token)
    vocab_size = max(len(tok), max(tok.get_vocab().values()) + 1)
    settings = {"tokenizer": str(tokenizer), "vocab_size": vocab_size, "eos_token": eos_name, "eos_token_id": eos_id,
                "add_special_tokens": add_special_tokens, "special_tokens_in_text": special_tokens_in_text,
                "txt_documents": txt_documents, "inputs": [str(p) for p in files]}
    writer = BlockWriter(out_dir, seq_len, blocks_per_sample, block_dtype(vocab_size), prefix, samples_per_shard)
    _write_info(out_dir, {**writer.summary(), **settings, "complete": False})  # marks an interrupted run as such
    encoder_args = (eos_id, add_special_tokens, special_tokens_in_text)
    batches = encode_stream(iter_documents(files, txt_documents), Encoder(processor, *encoder_args), batch_size,
                            num_workers, (tokenizer, trust_remote_code, *encoder_args))
    skips, started = SkipLog(out_dir / SKIPPED_NAME, log_first), time.monotonic()
    try:
        with writer:
            documents = _consume(batches, writer, skips)
    finally:
        skips.close()
    info = {**writer.summary(), **settings, "documents": documents, "skipped": dict(sorted(skips.counts.items())),
            "skipped_total": sum(skips.counts.values()), "complete": True}
    _write_info(out_dir, info)
    _print_summary(info, out_dir, time.monotonic() - started)
    return info


def _write_info(out_dir: Path, info: dict[str, Any]) -> None:
    tmp = out_dir / f".{PACK_INFO_NAME}.tmp"
    tmp.write_text(json.dumps(info, indent=1, ensure_ascii=False))
    os.replace(tmp, out_dir / PACK_INFO_NAME)  # atomic: a killed run never leaves half a pack_info.json


def _consume(batches: Iterable[list[np.ndarray | Skip]], writer: BlockWriter, skips: SkipLog) -> int:
    """Feed encoded documents to the writer and skips to the log, with a progress bar; returns documents."""
    from tqdm import tqdm

    documents = 0
    with tqdm(desc="pack-text", unit=" doc", mininterval=1.0, file=sys.stderr) as bar:
        for batch in batches:
            for item in batch:
                if isinstance(item, Skip):
                    skips.add(item)
                else:
                    documents += 1
                    writer.add(item)
            bar.update(sum(not isinstance(item, Skip) for item in batch))
            bar.set_postfix(tokens=writer.packer.tokens, blocks=writer.packer.blocks,
                            skipped=sum(skips.counts.values()), refresh=False)
    return documents


def _eos(tok: Any, path: str, eos_token: str | None) -> tuple[int, str]:
    """The end-of-document id and token: ``eos_token`` when given, else the tokenizer's EOS."""
    if eos_token is None:
        if tok.eos_token_id is None:
            raise ValueError(f"the tokenizer at {path!r} defines no EOS token; name one with --eos_token")
        return int(tok.eos_token_id), str(tok.eos_token)
    vocab = tok.get_vocab()
    if eos_token not in vocab:
        raise ValueError(f"--eos_token {eos_token!r} is not a token of the tokenizer at {path!r}")
    return int(vocab[eos_token]), eos_token


def _prepare_out(out_dir: Path, files: Sequence[Path], overwrite: bool) -> None:
    """Refuse to write into an earlier pack (or remove it when overwriting) and into an input directory."""
    if any(p.resolve().parent == out_dir.resolve() for p in files):
        raise ValueError(f"--out {str(out_dir)!r} holds input files; write the pack to another directory")
    if not out_dir.is_dir():
        return
    ours = [out_dir / n for n in (PACK_INFO_NAME, "sizes.json", SKIPPED_NAME) if (out_dir / n).is_file()]
    tars = sorted(out_dir.glob("*.tar"))
    if not ours and not tars:
        return
    if not (out_dir / PACK_INFO_NAME).is_file():
        raise FileExistsError(f"--out {str(out_dir)!r} holds shards that pack-text did not write (no "
                              f"{PACK_INFO_NAME}); choose an empty directory")
    if not overwrite:
        raise FileExistsError(f"--out {str(out_dir)!r} already holds a pack; pass --overwrite true to replace "
                              "it, or choose another directory")
    # a pack killed before closing has no sizes.json entry for its last shards: its prefix identifies them
    old_prefix = str(json.loads((out_dir / PACK_INFO_NAME).read_text()).get("prefix", ""))
    listed = set(json.loads((out_dir / "sizes.json").read_text())) if (out_dir / "sizes.json").is_file() else set()
    pattern = re.compile(rf"{re.escape(old_prefix)}-\d{{6}}\.tar")
    strangers = [p.name for p in tars if p.name not in listed and not pattern.fullmatch(p.name)]
    if strangers:
        raise FileExistsError(f"--out {str(out_dir)!r} holds tar files not listed in its sizes.json "
                              f"({strangers[:3]}); remove them or choose another directory")
    for path in [*tars, *ours]:
        path.unlink()


def _print_summary(info: dict[str, Any], out_dir: Path, seconds: float) -> None:
    skipped = ", ".join(f"{k} {v}" for k, v in info["skipped"].items())
    print(f"pack-text -> {out_dir}: {info['documents']} documents, {info['tokens']} tokens "
          f"({info['tokens'] / max(seconds, 1e-9):.0f} tokens/s), {info['blocks']} blocks of {info['block_len']} "
          f"{info['dtype']} tokens in {info['samples']} samples / {len(info['shards'])} shards; dropped tail "
          f"{info['dropped_tail_tokens']} tokens; skipped {info['skipped_total']}"
          + (f" ({skipped}; listed in {out_dir / SKIPPED_NAME})" if skipped else ""))
    if not info["blocks"]:
        print(f"warning: fewer than seq_len + 1 = {info['block_len']} tokens in total: no block was written",
              file=sys.stderr)
