"""Evaluation: the judge score ratio, rollout diversity, per-reply records and results tables."""

from latent_mca.eval.diversity import (
    HFMeanPoolEncoder,
    NgramEncoder,
    SentenceTransformerEncoder,
    TextEncoder,
    cosine_distances,
    distinct_n,
    diversity_report,
    self_bleu,
    semantic_diversity,
)
from latent_mca.eval.metrics import RatioReport, judge_score_ratio
from latent_mca.eval.records import (
    DuplicateRecordError,
    EvalRecord,
    fmt_mean_std,
    markdown_table,
    read_records,
    record_id,
    replies_by_split,
    scores_by_split,
    write_records,
)

__all__ = [
    "DuplicateRecordError",
    "EvalRecord",
    "HFMeanPoolEncoder",
    "NgramEncoder",
    "RatioReport",
    "SentenceTransformerEncoder",
    "TextEncoder",
    "cosine_distances",
    "distinct_n",
    "diversity_report",
    "fmt_mean_std",
    "judge_score_ratio",
    "markdown_table",
    "read_records",
    "record_id",
    "replies_by_split",
    "scores_by_split",
    "self_bleu",
    "semantic_diversity",
    "write_records",
]
