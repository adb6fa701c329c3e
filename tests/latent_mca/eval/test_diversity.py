import math
import sys

import pytest
import torch

from latent_mca.eval.diversity import (
    HFMeanPoolEncoder,
    NgramEncoder,
    SentenceTransformerEncoder,
    TextEncoder,
    distinct_n,
    diversity_report,
    self_bleu,
    semantic_diversity,
)


class TableEncoder:
    """Maps each text to a fixed vector."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        return torch.tensor([self.table[t] for t in texts], dtype=torch.float32)


def test_semantic_diversity_hand_values():
    assert semantic_diversity(torch.tensor([[1.0, 0.0], [0.0, 3.0]])) == pytest.approx(2.0)
    # pairs: (0,1) same direction -> 0, (0,2) and (1,2) orthogonal -> 1
    assert semantic_diversity(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])) == pytest.approx(1 + 2 / 3)
    # 60 degrees apart -> 1 - 0.5
    assert semantic_diversity(torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])) == pytest.approx(1.5)


def test_zero_vector_conventions():
    assert semantic_diversity(torch.zeros(2, 3)) == pytest.approx(1.0)
    assert semantic_diversity(torch.tensor([[0.0, 0.0], [1.0, 0.0]])) == pytest.approx(2.0)


def test_semantic_diversity_needs_two():
    with pytest.raises(ValueError, match="at least 2"):
        semantic_diversity(torch.ones(1, 4))


def test_ngram_tfidf_hand_values():
    enc = NgramEncoder(ngram_range=(1, 1))
    e = enc.encode(["a b", "a c"])
    idf_rare = math.log(3 / 2) + 1  # df = 1 of N = 2; "a" has df = 2 -> idf 1
    expected_cos = 1 / (1 + idf_rare ** 2)
    assert e.shape == (2, 3)
    assert torch.linalg.vector_norm(e, dim=1) == pytest.approx([1.0, 1.0])
    assert float(e[0] @ e[1]) == pytest.approx(expected_cos, rel=1e-5)


def test_ngram_encoder_fitted_on_corpus():
    enc = NgramEncoder(corpus=["a x", "a y", "a z"], ngram_range=(1, 1))
    e = enc.encode(["a b", "a c"])
    idf_a = math.log(4 / 4) + 1
    idf_unseen = math.log(4 / 1) + 1
    expected_cos = idf_a ** 2 / (idf_a ** 2 + idf_unseen ** 2)
    assert float(e[0] @ e[1]) == pytest.approx(expected_cos, rel=1e-5)
    assert enc.fitted and isinstance(enc, TextEncoder)


def test_ngram_encoder_uses_bigrams():
    # same words, different order: unigram vectors equal, bigrams differ
    uni = NgramEncoder(ngram_range=(1, 1)).encode(["red circle left", "left circle red"])
    both = NgramEncoder().encode(["red circle left", "left circle red"])
    assert float(uni[0] @ uni[1]) == pytest.approx(1.0)
    assert float(both[0] @ both[1]) < 0.99


def test_identical_replies_give_one():
    report = diversity_report({"p": ["The red circle is on the left."] * 3})
    assert report["semantic_diversity"] == pytest.approx(1.0, abs=1e-6)
    assert report["self_bleu"] == pytest.approx(1.0)


def test_more_different_sets_score_higher():
    groups = {
        "same": ["the red circle is at the top"] * 3,
        "close": ["the red circle is at the top", "the red circle is at the bottom", "the red circle is at the top"],
        "far": ["the red circle is at the top", "a blue square sits in a corner", "hello there my friend"],
    }
    rows = diversity_report(groups, per_prompt=True)["per_prompt"]
    sd = {k: v["semantic_diversity"] for k, v in rows.items()}
    assert sd["same"] == pytest.approx(1.0, abs=1e-6)
    assert 1.0 < sd["close"] < sd["far"] <= 2.0
    assert rows["far"]["self_bleu"] < rows["close"]["self_bleu"] < rows["same"]["self_bleu"]


def test_distinct_n_hand_values():
    texts = ["the cat the cat", "the dog"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # the-cat twice, cat-the, the-dog
    assert distinct_n(["The cat.", "the CAT!"], 1) == pytest.approx(2 / 4)
    assert math.isnan(distinct_n(["yes", "no"], 2))


def test_report_averages_over_prompts_and_counts_skips():
    groups = {"p1": ["the cat the cat", "the dog"], "p2": ["a b", "c d"], "p3": ["alone"], "p4": ["yes", "no"]}
    report = diversity_report(groups)
    assert report["distinct_1"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert report["distinct_2"] == pytest.approx((0.75 + 1.0) / 2)
    assert report["distinct_2_undefined"] == 1
    assert report["skipped_prompts"] == 1
    assert report["num_prompts"] == 3 and report["num_replies"] == 6
    assert report["encoder"].startswith("ngram_tfidf")
    assert "per_prompt" not in report


def test_self_bleu_disjoint_is_zero():
    assert self_bleu(["one two three four five", "six seven eight nine ten"]) == pytest.approx(0.0)


def test_pluggable_encoder_and_chunking():
    table = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 1.0]}
    groups = {"p1": ["a", "b"], "p2": ["a", "a", "c"], "p3": ["b", "c"]}
    one_call = TableEncoder(table)
    chunked = TableEncoder(table)
    r1 = diversity_report(groups, one_call, per_prompt=True)
    r2 = diversity_report(groups, chunked, chunk_size=2, per_prompt=True)
    d_ac = 1 - 1 / math.sqrt(2)
    expected = {"p1": 2.0, "p2": 1 + (0 + d_ac + d_ac) / 3, "p3": 1 + d_ac}
    for key, value in expected.items():
        assert r1["per_prompt"][key]["semantic_diversity"] == pytest.approx(value)
        assert r2["per_prompt"][key]["semantic_diversity"] == pytest.approx(value)
    assert r1["semantic_diversity"] == pytest.approx(sum(expected.values()) / 3)
    assert one_call.calls == 1 and chunked.calls == 3


def test_bad_inputs():
    with pytest.raises(TypeError, match="'p'"):
        diversity_report({"p": ["ok", None]})

    class Broken:
        def encode(self, texts):
            return torch.zeros(len(texts) + 1, 2)

    with pytest.raises(ValueError, match="Broken"):
        diversity_report({"p": ["a", "b"]}, Broken())


def test_sentence_transformer_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="local"):
        SentenceTransformerEncoder(tmp_path / "nope")


def test_sentence_transformer_missing_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # makes the import fail
    with pytest.raises(ImportError, match="sentence-transformers"):
        SentenceTransformerEncoder(tmp_path)


@pytest.fixture(scope="module")
def tiny_backbone_dir(tmp_path_factory):
    from latent_mca.models.tiny import build_tiny_backbone
    from tests.helpers.vlm_families import CORPUS, SMALL

    return build_tiny_backbone(tmp_path_factory.mktemp("bb"), CORPUS, SMALL)


def test_hf_mean_pool_encoder(tiny_backbone_dir):
    texts = ["I see a red circle at the center.", "Where is it?", "I see a red circle at the center.", ""]
    enc = HFMeanPoolEncoder(str(tiny_backbone_dir), batch_size=4, device="cpu")
    e = enc.encode(texts)
    assert e.shape == (4, 32) and e.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(e[0], e[2], dim=0)) == pytest.approx(1.0, abs=1e-5)
    assert float(cos(e[0], e[1], dim=0)) < 0.999
    assert torch.all(e[3] == 0)
    # padding must not change an embedding: one text per batch gives the same vectors
    single = HFMeanPoolEncoder(enc.backbone, batch_size=1, device="cpu").encode(texts)
    torch.testing.assert_close(single, e, atol=1e-5, rtol=1e-4)
    report = diversity_report({"same": texts[:1] * 2, "diff": texts[:2]}, enc, per_prompt=True)
    assert report["per_prompt"]["same"]["semantic_diversity"] == pytest.approx(1.0, abs=1e-5)
    assert report["per_prompt"]["diff"]["semantic_diversity"] > 1.0
