r"""Rollout diversity: how different the N replies sampled for one prompt are, in meaning and in wording.

The paper reports a "rollout semantic diversity" (about 1.07 for the SFT baseline and 1.25 with latent
actions) but the authors' code has no implementation of it, so the definition here is ours:

**Semantic diversity.** For a prompt with ``N >= 2`` sampled replies with embeddings ``e_1 .. e_N``,

    ``SD = 1 + mean_{i<j} (1 - cos(e_i, e_j))``,

the mean over the ``N (N - 1) / 2`` unordered pairs. A split's score is the mean of ``SD`` over its prompts.
``SD = 1`` means every reply of every prompt is the same in meaning; with embeddings in a positive orthant
(the default TF-IDF encoder) it is at most 2 (no shared feature at all). Two conventions for empty replies:
an empty reply has a zero embedding, two empty replies are at distance 0 and an empty and a non-empty reply
are at distance 1. Prompts with fewer than two replies are skipped and counted.

The value depends on the encoder, so always report which one was used:

- :class:`NgramEncoder` (default, no model): TF-IDF weighted counts of word unigrams and bigrams, L2
  normalised. In :func:`diversity_report` the IDF is fitted on all replies passed in (or on a corpus you give).
- :class:`HFMeanPoolEncoder`: the mask-weighted mean of the last hidden states of any text model or VLM that
  :class:`~latent_mca.models.backbone.Backbone` loads. Hidden-state means of language models are strongly
  anisotropic, so distances are small and only comparable within one encoder.
- :class:`SentenceTransformerEncoder`: a sentence-transformers model loaded from a local directory (the
  package is optional and not a dependency).

**Lexical cross-checks.** distinct-n is the number of unique word n-grams divided by the total number of word
n-grams over all replies of a prompt, averaged over prompts (higher = more diverse; a prompt whose replies
have no n-gram at all is left out and counted). Self-BLEU is, per prompt, the mean over replies of the BLEU of
that reply against the other replies as references (torchmetrics ``bleu_score``, add-one smoothing), averaged
over prompts (lower = more diverse); a reply shorter than the BLEU order (4 words by default) scores 0, as
in torchmetrics. Both use lower-cased word tokens (``\w+`` with inner apostrophes).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

_WORD = re.compile(r"\w+(?:'\w+)*")


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (punctuation dropped)."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous ``n``-grams of a token list, in order."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that maps texts to one embedding vector each."""

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Embed texts.

        Args:
            texts: The texts.

        Returns:
            Embeddings, shape ``(len(texts), dim)``.
        """


class NgramEncoder:
    """TF-IDF weighted bag of word n-grams, L2 normalised (no model needed).

    The IDF is ``ln((1 + N) / (1 + df)) + 1`` (smoothed, as in common TF-IDF tools), with ``N`` documents in
    the fitting set and ``df`` the number of them containing the n-gram; n-grams never seen while fitting get
    ``df = 0``. The vocabulary of an :meth:`encode` call is the union of the n-grams of the texts encoded, so
    vectors of different calls are not comparable with each other (cosine within one call is).

    Args:
        corpus: Texts to fit the IDF on; None fits it on the texts of each :meth:`encode` call.
        ngram_range: Smallest and largest n-gram order.
    """

    def __init__(self, corpus: Iterable[str] | None = None, ngram_range: tuple[int, int] = (1, 2)) -> None:
        low, high = ngram_range
        if not 1 <= low <= high:
            raise ValueError(f"ngram_range must satisfy 1 <= low <= high, got {ngram_range}")
        self.ngram_range = (low, high)
        self.name = f"ngram_tfidf({low}-{high})"
        self._df: Counter[tuple[str, ...]] | None = None
        self._num_docs = 0
        if corpus is not None:
            self._df, self._num_docs = self._document_frequencies(list(corpus))

    @property
    def fitted(self) -> bool:
        """Whether the IDF comes from a fixed corpus."""
        return self._df is not None

    def features(self, text: str) -> Counter[tuple[str, ...]]:
        """N-gram counts of one text."""
        tokens = words(text)
        low, high = self.ngram_range
        return Counter(g for n in range(low, high + 1) for g in ngrams(tokens, n))

    def _document_frequencies(self, texts: list[str]) -> tuple[Counter[tuple[str, ...]], int]:
        df: Counter[tuple[str, ...]] = Counter()
        for text in texts:
            df.update(self.features(text).keys())
        return df, len(texts)

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Embed texts as L2-normalised TF-IDF vectors (a text without words gets a zero vector).

        Args:
            texts: The texts.

        Returns:
            Embeddings, shape ``(len(texts), V)`` with ``V`` the number of distinct n-grams in ``texts``.
        """
        counts = [self.features(t) for t in texts]
        df, num_docs = (self._df, self._num_docs) if self._df is not None else \
            self._document_frequencies(list(texts))
        vocab = {g: i for i, g in enumerate(sorted({g for c in counts for g in c}))}
        out = torch.zeros(len(texts), max(len(vocab), 1))  # (n, V)
        for row, c in enumerate(counts):
            for gram, tf in c.items():
                out[row, vocab[gram]] = tf * (math.log((1 + num_docs) / (1 + df.get(gram, 0))) + 1.0)
        return torch.nn.functional.normalize(out, dim=1)


class HFMeanPoolEncoder:
    """Mean-pooled last hidden states of a text model or VLM loaded through :class:`Backbone`.

    Texts are tokenised one by one with the backbone's tokenizer (truncated to ``max_length``), right padded
    and run text-only through the backbone; the embedding is the mean of the final hidden states over the real
    tokens. A text with no tokens gets a zero vector.

    Args:
        model: A local checkpoint directory (or hub id, which needs network access) for
            ``Backbone.from_pretrained``, or an already built :class:`Backbone`.
        batch_size: Texts per forward pass.
        max_length: Token limit per text.
        device: Device to run on (default: CUDA if available, else CPU).
        dtype: Parameter dtype when loading from a path.
    """

    def __init__(self, model: Any, batch_size: int = 16, max_length: int = 512, device: str | None = None,
                 dtype: str = "float32") -> None:
        from latent_mca.models.backbone import Backbone

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, {max_length}")
        self.backbone = model if isinstance(model, Backbone) else Backbone.from_pretrained(str(model), dtype=dtype)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = f"hf_mean_pool:{model if isinstance(model, (str, Path)) else type(model).__name__}"

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """Embed texts (see the class docstring).

        Args:
            texts: The texts.

        Returns:
            Float32 CPU embeddings, shape ``(len(texts), d)``.
        """
        tok = self.backbone.tokenizer
        ids = [tok(t, truncation=True, max_length=self.max_length)["input_ids"] for t in texts]
        out = torch.zeros(len(texts), self.backbone.hidden_size)  # (n, d)
        todo = [i for i, x in enumerate(ids) if x]  # the model cannot take a zero-length row batch
        for start in range(0, len(todo), self.batch_size):
            rows = todo[start:start + self.batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), self.backbone.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            hidden = self.backbone(input_ids.to(self.device), mask.to(self.device)).float()  # (b, L, d)
            weights = mask.to(self.device).unsqueeze(-1).float()  # (b, L, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1)  # (b, d)
            out[rows] = pooled.cpu()
        return out


class SentenceTransformerEncoder:
    """A sentence-transformers model loaded from a local directory (never downloaded).

    Args:
        path: Local directory of a saved sentence-transformers model.
        batch_size: Texts per forward pass.
        device: Device to run on (sentence-transformers picks one if None).

    Raises:
        FileNotFoundError: If ``path`` is not an existing directory.
        ImportError: If the optional ``sentence-transformers`` package is not installed.
    """

    def __init__(self, path: str | Path, batch_size: int = 32, device: str | None = None) -> None:
        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"sentence-transformers model directory {str(path)!r} does not exist; this encoder loads local "
                "models only (no hub download): save one with SentenceTransformer(...).save(DIR) first"
            )
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ImportError(
                "SentenceTransformerEncoder needs the optional package sentence-transformers, which is not "
                "installed (pip install sentence-transformers); or use NgramEncoder / HFMeanPoolEncoder"
            ) from err
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.batch_size = batch_size
        self.name = f"sentence_transformers:{path}"

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Embed texts.

        Args:
            texts: The texts.

        Returns:
            Float32 CPU embeddings, shape ``(len(texts), dim)``.
        """
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True)
        return emb.float().cpu()


def cosine_distances(embeddings: Tensor) -> Tensor:
    """Pairwise ``1 - cos`` between rows, with the zero-vector conventions of the module docstring.

    Args:
        embeddings: Shape ``(n, dim)``.

    Returns:
        Distances, shape ``(n, n)``, in ``[0, 2]``.
    """
    emb = embeddings.double()
    norms = emb.norm(dim=1)  # (n,)
    zero = norms == 0
    unit = emb / norms.clamp_min(torch.finfo(emb.dtype).tiny).unsqueeze(1)  # (n, dim); zero rows stay zero
    sim = (unit @ unit.T).clamp(-1.0, 1.0)  # (n, n)
    sim[zero.unsqueeze(0) & zero.unsqueeze(1)] = 1.0  # two empty replies are the same reply
    return 1.0 - sim


def semantic_diversity(embeddings: Tensor) -> float:
    """``1 + mean_{i<j} (1 - cos(e_i, e_j))`` for the replies of one prompt.

    Args:
        embeddings: Reply embeddings, shape ``(N, dim)`` with ``N >= 2``.

    Returns:
        The semantic diversity (1.0 = identical in meaning).
    """
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError(f"semantic diversity needs at least 2 replies, got {n}")
    rows, cols = torch.triu_indices(n, n, offset=1)
    return 1.0 + float(cosine_distances(embeddings)[rows, cols].mean())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams over total word n-grams across ``texts`` (NaN if there is no n-gram)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def self_bleu(texts: Sequence[str], n_gram: int = 4) -> float:
    """Mean over replies of the smoothed BLEU of each reply against all the others (torchmetrics).

    Args:
        texts: At least two replies of one prompt.
        n_gram: Highest n-gram order of BLEU.

    Returns:
        Self-BLEU in ``[0, 1]`` (1 = every reply repeats the others).
    """
    from torchmetrics.functional.text import bleu_score

    if len(texts) < 2:
        raise ValueError(f"self-BLEU needs at least 2 replies, got {len(texts)}")
    norm = [" ".join(words(t)) for t in texts]
    scores = [float(bleu_score([norm[i]], [norm[:i] + norm[i + 1:]], n_gram=n_gram, smooth=True))
              for i in range(len(norm))]
    return statistics.fmean(scores)


def _embed_groups(groups: dict[str, list[str]], encoder: TextEncoder, chunk_size: int) -> dict[str, Tensor]:
    """Embed every group, batching several groups per encoder call."""
    out: dict[str, Tensor] = {}
    keys = list(groups)
    start = 0
    while start < len(keys):
        chunk = [keys[start]]
        size = len(groups[keys[start]])
        while start + len(chunk) < len(keys) and size + len(groups[keys[start + len(chunk)]]) <= chunk_size:
            size += len(groups[keys[start + len(chunk)]])
            chunk.append(keys[start + len(chunk)])
        texts = [t for k in chunk for t in groups[k]]
        emb = encoder.encode(texts)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"{type(encoder).__name__}.encode returned shape {tuple(emb.shape)} for "
                             f"{len(texts)} texts, expected ({len(texts)}, dim)")
        offset = 0
        for k in chunk:
            out[k] = emb[offset:offset + len(groups[k])]
            offset += len(groups[k])
        start += len(chunk)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    kept = [v for v in values if not math.isnan(v)]
    mean = statistics.fmean(kept) if kept else math.nan
    return mean, statistics.stdev(kept) if len(kept) >= 2 else math.nan


def diversity_report(groups: Mapping[str, Sequence[str]], encoder: TextEncoder | None = None, *,
                     bleu_n_gram: int = 4, chunk_size: int = 64, per_prompt: bool = False) -> dict[str, Any]:
    """Semantic diversity, distinct-1/2 and self-BLEU of the replies sampled for each prompt.

    Args:
        groups: Prompt key -> its sampled replies (in generation order).
        encoder: Embedding model; None uses an :class:`NgramEncoder` whose IDF is fitted on all replies here
            (an unfitted :class:`NgramEncoder` is fitted the same way).
        bleu_n_gram: Highest n-gram order of self-BLEU.
        chunk_size: About how many replies to embed per encoder call (whole prompts are never split).
        per_prompt: Also return every prompt's values under ``"per_prompt"``.

    Returns:
        ``semantic_diversity`` (mean over prompts) and ``semantic_diversity_std`` (over prompts),
        ``distinct_1``, ``distinct_2``, ``self_bleu``, ``encoder`` (a name), ``num_prompts`` (prompts with at
        least two replies, the ones averaged), ``num_replies``, ``skipped_prompts`` (fewer than two replies),
        ``distinct_1_undefined`` / ``distinct_2_undefined`` (prompts without any such n-gram), and optionally
        ``per_prompt``.

    Raises:
        TypeError: If a reply is not a string (the message names the prompt key).
    """
    for key, replies in groups.items():
        bad = [i for i, r in enumerate(replies) if not isinstance(r, str)]
        if bad:
            raise TypeError(f"prompt {key!r}: replies {bad} are not strings (got {type(replies[bad[0]]).__name__})")
    kept = {k: list(v) for k, v in groups.items() if len(v) >= 2}
    if encoder is None or (isinstance(encoder, NgramEncoder) and not encoder.fitted):
        encoder = NgramEncoder([t for v in kept.values() for t in v],
                               encoder.ngram_range if encoder is not None else (1, 2))
    embeddings = _embed_groups(kept, encoder, chunk_size)
    rows = {k: {"semantic_diversity": semantic_diversity(embeddings[k]), "distinct_1": distinct_n(v, 1),
                "distinct_2": distinct_n(v, 2), "self_bleu": self_bleu(v, bleu_n_gram)} for k, v in kept.items()}
    report: dict[str, Any] = {}
    for metric in ("semantic_diversity", "distinct_1", "distinct_2", "self_bleu"):
        mean, std = _mean_std([r[metric] for r in rows.values()])
        report[metric] = mean
        if metric == "semantic_diversity":
            report["semantic_diversity_std"] = std
    report.update(
        encoder=getattr(encoder, "name", type(encoder).__name__),
        num_prompts=len(kept),
        num_replies=sum(len(v) for v in kept.values()),
        skipped_prompts=len(groups) - len(kept),
        distinct_1_undefined=sum(math.isnan(r["distinct_1"]) for r in rows.values()),
        distinct_2_undefined=sum(math.isnan(r["distinct_2"]) for r in rows.values()),
    )
    if per_prompt:
        report["per_prompt"] = rows
    return report
