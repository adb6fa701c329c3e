import json
import math

import pytest

from latent_mca.eval.metrics import judge_score_ratio
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
from latent_mca.rl.rewards.base import PairScores

ASPECTS = ("Fluency", "Coherency")


def rec(split="ood", key="dlg/1/turn_2", g=0, scores=(8, 6, 8, 3), error=None, reply="hi"):
    pair = None if scores is None else PairScores(ASPECTS, scores[:2], scores[2:])
    return EvalRecord(split=split, key=key, generation=g, reply=reply, reference="hello", scores=pair,
                      score_error=error, metadata={"ckpt": "a.ckpt", "codes": [3, 1]})


def test_round_trip(tmp_path):
    records = [rec(g=0), rec(g=1, scores=None, error="judge returned 1 pair, expected 2"), rec(split="id", g=0)]
    path = write_records(tmp_path / "sub" / "records.jsonl", records)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["id"] == "ood|dlg/1/turn_2|0"
    assert first["scores"] == {"Fluency": [8, 8], "Coherency": [6, 3]}
    assert json.loads(lines[1])["scores"] is None
    back = read_records(path)
    assert back == records


def test_duplicate_ids_raise_before_writing(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(DuplicateRecordError, match=r"ood\|dlg/1/turn_2\|0"):
        write_records(path, [rec(), rec(reply="other")])
    assert not path.exists()


def test_append_checks_existing_file(tmp_path):
    path = write_records(tmp_path / "r.jsonl", [rec(g=0)])
    write_records(path, [rec(g=1)], append=True)
    assert [r.generation for r in read_records(path)] == [0, 1]
    with pytest.raises(DuplicateRecordError):
        write_records(path, [rec(g=1)], append=True)
    assert len(read_records(path)) == 2


def test_same_key_other_split_or_generation_is_fine():
    ids = {record_id(s, "k", g) for s in ("id", "ood") for g in (0, 1)}
    assert len(ids) == 4


def test_read_rejects_duplicates_and_bad_lines(tmp_path):
    line = json.dumps(rec().to_json())
    dup = tmp_path / "dup.jsonl"
    dup.write_text(line + "\n" + line + "\n")
    with pytest.raises(DuplicateRecordError, match="dup.jsonl"):
        read_records(dup)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(bad)
    obj = rec().to_json()
    del obj["reference"]
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(obj) + "\n")
    with pytest.raises(ValueError, match="missing.jsonl:1.*reference"):
        read_records(missing)


def test_missing_scores_need_a_reason():
    with pytest.raises(ValueError, match="score_error"):
        rec(scores=None, error=None)
    with pytest.raises(ValueError, match="score_error"):
        rec(error="both given")
    with pytest.raises(ValueError, match="'\\|'"):
        rec(split="a|b")


def test_nan_is_refused_on_write(tmp_path):
    bad = rec()
    bad.metadata["x"] = float("nan")
    with pytest.raises(ValueError, match="strict JSON"):
        write_records(tmp_path / "r.jsonl", [bad])


def test_grouping_helpers_feed_the_metrics():
    records = [rec(g=1, reply="b"), rec(g=0, reply="a"), rec(key="k2", g=0, scores=None, error="timeout"),
               rec(split="id", g=0, reply="c")]
    scores = scores_by_split(records)
    assert set(scores) == {"ood", "id"}
    assert scores["ood"][("k2", 0)] is None
    report = judge_score_ratio(scores["ood"])
    assert report.num_excluded == 1 and report.mean == pytest.approx(1.5, rel=1e-5)
    assert replies_by_split(records)["ood"]["dlg/1/turn_2"] == ["a", "b"]
    with pytest.raises(DuplicateRecordError):
        scores_by_split(records + [rec(g=1)])


def test_fmt_mean_std():
    assert fmt_mean_std(0.95312, 0.01234) == "0.953 ± 0.012"
    assert fmt_mean_std(0.95312, 0.01234, digits=1, scale=100) == "95.3 ± 1.2"
    assert fmt_mean_std(0.5, math.nan) == "0.500 ± n/a"
    assert fmt_mean_std(math.nan, math.nan) == "n/a"


def test_markdown_table_shape_and_alignment():
    rows = [{"method": "SFT", "ratio": 0.9, "n": 120}, {"method": "Latent | RL", "ratio": math.nan},
            {"method": "x", "ratio": 1.25, "n": 7}]
    text = markdown_table(rows, {"method": "Method", "ratio": "Ratio", "n": "N"}, digits=2)
    lines = text.rstrip("\n").split("\n")
    assert len(lines) == 2 + len(rows)
    assert lines[0].split("|")[1].strip() == "Method"
    assert lines[1] == "| ------------ | ----: | --: |"
    assert len({len(line) for line in lines}) == 1  # padded to equal width
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]
    assert cells[0] == ["SFT", "0.90", "120"]
    assert cells[1] == ["Latent \\| RL", "n/a", "-"]
    assert lines[2].endswith(" 120 |") and lines[4].endswith("   7 |")
    assert markdown_table(rows, ["n"]).splitlines()[0] == "|   n |"
    with pytest.raises(ValueError):
        markdown_table(rows, [])
