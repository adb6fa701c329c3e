import json
import logging

import pytest

from .builders import authors_mm, authors_text, image_bytes, read_samples, run_shards, write_file, write_records


def _mm_file(tmp_path, n=3, name="mm.json"):
    root = tmp_path / "images"
    records = [authors_mm(f"r{i}", f"{i}.png", answer=f"answer {i}") for i in range(n)]
    for i in range(n):
        write_file(root, f"{i}.png", image_bytes("PNG", seed=i))
    return write_records(tmp_path / name, records), root


def test_missing_input_names_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        run_shards("--format", "authors", "--input", str(missing), "--out", str(tmp_path / "out"))


def test_missing_images_root_names_the_path(tmp_path):
    src, _ = _mm_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        run_shards("--format", "authors", "--input", str(src), "--out", str(tmp_path / "out"),
                   "--images_root", str(tmp_path / "no_such_root"))


def test_single_json_object_is_rejected_with_the_path(tmp_path):
    src = tmp_path / "obj.json"
    src.write_text(json.dumps({"id": "x", "messages": []}, indent=1))
    with pytest.raises(ValueError, match="obj.json"):
        run_shards("--format", "authors", "--input", str(src), "--out", str(tmp_path / "out"))


def test_images_root_defaults_to_the_input_directory(tmp_path):
    write_file(tmp_path, "pic.png", image_bytes("PNG"))
    src = write_records(tmp_path / "mm.json", [authors_mm("a", "pic.png")])
    result = run_shards("--format", "authors", "--input", str(src), "--out", str(tmp_path / "out"))
    assert result["written"] == {"paired": 1} and result["skipped_total"] == 0


def test_existing_prefix_is_refused_then_overwritten_cleanly(tmp_path):
    src, root = _mm_file(tmp_path)
    out = tmp_path / "out"
    args = ["--format", "authors", "--input", str(src), "--out", str(out), "--images_root", str(root)]
    run_shards(*args, "--samples_per_shard", "1")
    assert sorted(p.name for p in (out / "paired").glob("*.tar")) == [f"mm-00000{i}.tar" for i in range(3)]
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_shards(*args)
    run_shards(*args, "--overwrite", "true", "--samples_per_shard", "10")
    assert [p.name for p in (out / "paired").glob("*.tar")] == ["mm-000000.tar"]
    assert json.loads((out / "paired" / "sizes.json").read_text()) == {"mm-000000.tar": 3}
    assert [s["__key__"] for s in read_samples(out / "paired")] == ["r0", "r1", "r2"]


def test_two_files_into_one_output_keep_both_reports(tmp_path):
    src, root = _mm_file(tmp_path, n=2, name="MM_pretrain.json")
    text_src = write_records(tmp_path / "TextOnly_pretrain.json", [authors_text("t0"), authors_text("t1")])
    out = tmp_path / "out"
    run_shards("--format", "authors", "--input", str(src), "--out", str(out), "--images_root", str(root))
    second = run_shards("--format", "authors", "--input", str(text_src), "--out", str(out))
    assert second["written"] == {"text_only": 2}
    assert json.loads((out / "paired" / "sizes.json").read_text()) == {"MM_pretrain-000000.tar": 2}
    assert json.loads((out / "text_only" / "sizes.json").read_text()) == {"TextOnly_pretrain-000000.tar": 2}
    report = json.loads((out / "import_report.json").read_text())
    assert report["prefix"] == "TextOnly_pretrain"
    assert [r["prefix"] for r in report["earlier_imports"]] == ["MM_pretrain"]
    assert report["earlier_imports"][0]["written"] == {"paired": 2}


def test_bad_prefix_is_rejected(tmp_path):
    src, root = _mm_file(tmp_path)
    with pytest.raises(ValueError, match="prefix"):
        run_shards("--format", "mmrole", "--input", str(src), "--out", str(tmp_path / "o"),
                   "--images_root", str(root), "--split", "test id")


def test_workers_give_the_same_shards_in_the_same_order(tmp_path):
    root = tmp_path / "images"
    records = []
    for i in range(150):  # several worker chunks
        if i % 7 == 3:
            records.append(authors_mm(f"r{i}", f"missing{i}.png"))
        else:
            write_file(root, f"{i}.png", image_bytes("PNG", seed=i, size=8))
            records.append(authors_mm(f"r{i}", f"{i}.png", answer=f"answer {i}"))
    src = write_records(tmp_path / "mm.json", records)
    outs = {}
    for workers in ("0", "2"):
        outs[workers] = run_shards("--format", "authors", "--input", str(src), "--out", str(tmp_path / workers),
                                   "--images_root", str(root), "--num_workers", workers, "--samples_per_shard", "40")
    serial, parallel = read_samples(tmp_path / "0" / "paired"), read_samples(tmp_path / "2" / "paired")
    assert [s["__key__"] for s in parallel] == [s["__key__"] for s in serial]
    assert all(a["png"] == b["png"] and a["json"] == b["json"] for a, b in zip(serial, parallel))
    missing = sum(1 for i in range(150) if i % 7 == 3)
    assert outs["2"]["skipped"] == outs["0"]["skipped"] == {"missing_image": missing}
    assert len(serial) == 150 - missing
    assert outs["2"]["skipped_records"] == outs["0"]["skipped_records"]


def test_skip_log_is_rate_limited(tmp_path, caplog):
    records = [authors_mm(f"gone{i}", f"gone{i}.png") for i in range(25)]
    src = write_records(tmp_path / "mm.json", records)
    with caplog.at_level(logging.WARNING, logger="latent_mca.importers"):
        result = run_shards("--format", "authors", "--input", str(src), "--out", str(tmp_path / "out"),
                            "--log_first", "3")
    assert result["skipped"] == {"missing_image": 25} and len(result["skipped_records"]) == 25
    one_by_one = [r for r in caplog.records if r.getMessage().startswith("skipped record")]
    assert [r.getMessage().split()[2] for r in one_by_one] == ["gone0", "gone1", "gone2"]
    assert len(caplog.records) == 4  # plus one "10 records skipped so far" line; nothing at 25
    assert "10 records skipped" in caplog.records[-1].getMessage()
