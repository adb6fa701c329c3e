import json

import pytest

from .builders import (
    authors_mm,
    authors_text,
    image_bytes,
    read_samples,
    run_shards,
    tar_counts,
    write_file,
    write_records,
)


@pytest.fixture()
def authors_import(tmp_path):
    """An authors'-format file with good and bad records, imported with 2 samples per shard."""
    root = tmp_path / "images"
    images = {
        "a/one.png": write_file(root, "a/one.png", image_bytes("PNG", seed=1)),
        "a/two.jpg": write_file(root, "a/two.jpg", image_bytes("JPEG", seed=2)),
        "a/three.webp": write_file(root, "a/three.webp", image_bytes("WEBP", seed=3)),
        "a/dup.png": write_file(root, "a/dup.png", image_bytes("PNG", seed=4)),
    }
    write_file(root, "bad/corrupt.png", b"\x89PNG\r\n\x1a\n definitely not a png body")
    jpeg = image_bytes("JPEG", seed=5)
    write_file(root, "bad/truncated.jpg", jpeg[: len(jpeg) // 2])  # header intact: only a full load fails
    two_turns = authors_mm("mm_mid", "a/three.webp", user="Look at <image> and describe it.")
    two_turns["messages"] += [{"role": "user", "content": "And the colour?"},
                              {"role": "assistant", "content": "Red."}]
    records = [
        authors_mm("mm_start", "a/one.png"),
        authors_mm("mm_noplace", "a/two.jpg", user="Describe the picture.", system=None),
        two_turns,
        authors_text("txt_absent", "Plain text one."),
        authors_text("txt_none", "Plain text two.", none_image=True),
        authors_mm("mm_start", "a/dup.png", answer="Another answer."),  # duplicate id: kept with a suffix
        authors_mm("missing", "a/nowhere.png"),
        authors_mm("corrupt", "bad/corrupt.png"),
        authors_mm("truncated", "bad/truncated.jpg"),
        {"id": "notlist", "images": ["a/one.png"], "messages": "hello"},
        {"images": ["a/one.png"], "messages": [{"role": "user", "content": "hi"}]},
        {"id": "narrator", "messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"id": "noanswer", "messages": [{"role": "user", "content": "only a question"}]},
        {**authors_mm("twoimg", "a/one.png"), "images": ["a/one.png", "a/two.jpg"]},
        {**authors_text("txt_placeholder"), "messages": [{"role": "user", "content": "<image> hi"},
                                                         {"role": "assistant", "content": "x"}]},
    ]
    src = write_records(tmp_path / "pretrain.json", records)
    out = tmp_path / "out"
    result = run_shards("--format", "authors", "--input", str(src), "--out", str(out),
                        "--images_root", str(root), "--samples_per_shard", "2")
    return result, out, images


def test_counts_and_report(authors_import):
    result, out, _ = authors_import
    assert result["records"] == 15
    assert result["written"] == {"paired": 4, "text_only": 2}
    assert result["skipped"] == {"missing_image": 1, "bad_image": 2, "malformed_record": 3, "unknown_role": 1,
                                 "no_assistant_turn": 1, "multiple_images": 1}
    assert result["duplicate_ids"] == 1
    report = json.loads((out / "import_report.json").read_text())
    assert report["skipped"] == result["skipped"] and report["written"] == result["written"]
    reasons = {r["id"]: r["reason"] for r in report["skipped_records"]}
    assert reasons == {"missing": "missing_image", "corrupt": "bad_image", "truncated": "bad_image",
                       "notlist": "malformed_record", "#10": "malformed_record", "narrator": "unknown_role",
                       "noanswer": "no_assistant_turn", "twoimg": "multiple_images",
                       "txt_placeholder": "malformed_record"}
    assert "nowhere.png" in next(r["detail"] for r in report["skipped_records"] if r["id"] == "missing")


def test_paired_samples_keep_original_bytes_and_place_the_image(authors_import):
    _, out, images = authors_import
    samples = {s["__key__"]: s for s in read_samples(out / "paired")}
    assert set(samples) == {"mm_start", "mm_noplace", "mm_mid", "mm_start_dup1"}
    assert samples["mm_start"]["png"] == images["a/one.png"]
    assert samples["mm_noplace"]["jpg"] == images["a/two.jpg"]
    assert samples["mm_mid"]["webp"] == images["a/three.webp"]
    assert samples["mm_start_dup1"]["png"] == images["a/dup.png"]

    start = samples["mm_start"]["json"]
    assert start["id"] == "mm_start" and start["source"] == "mm_conversation"
    assert start["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": "A red square."},
    ]
    # No placeholder: the image opens the first user turn.
    assert samples["mm_noplace"]["json"]["messages"][0]["content"] == [
        {"type": "image"}, {"type": "text", "text": "Describe the picture."}]
    # Placeholder mid-sentence: the image item sits where it was; later user turns stay plain strings.
    mid = samples["mm_mid"]["json"]["messages"]
    assert mid[1]["content"] == [{"type": "text", "text": "Look at"}, {"type": "image"},
                                 {"type": "text", "text": "and describe it."}]
    assert mid[3] == {"role": "user", "content": "And the colour?"}
    assert all("<image>" not in json.dumps(s["json"]) for s in samples.values())


def test_duplicate_ids_are_both_kept(authors_import):
    result, out, _ = authors_import
    samples = {s["__key__"]: s["json"] for s in read_samples(out / "paired")}
    assert samples["mm_start"]["messages"][-1]["content"] == "A red square."
    assert samples["mm_start_dup1"]["messages"][-1]["content"] == "Another answer."
    assert samples["mm_start_dup1"]["source_id"] == "mm_start"
    assert result["duplicate_records"] == [{"id": "mm_start", "key": "mm_start_dup1"}]


def test_text_only_samples(authors_import):
    _, out, _ = authors_import
    samples = read_samples(out / "text_only")
    assert [s["__key__"] for s in samples] == ["txt_absent", "txt_none"]
    assert all({k for k in s if not k.startswith("__")} == {"json"} for s in samples)
    first = samples[0]["json"]
    assert first["source"] == "General" and first["id"] == "txt_absent"
    assert first["messages"][-1] == {"role": "assistant", "content": "Plain text one."}
    assert all(isinstance(m["content"], str) for s in samples for m in s["json"]["messages"])


def test_sizes_json_matches_the_tars(authors_import):
    result, out, _ = authors_import
    for kind, expected in (("paired", 4), ("text_only", 2)):
        sizes = json.loads((out / kind / "sizes.json").read_text())
        assert sizes == tar_counts(out / kind)
        assert sum(sizes.values()) == expected and max(sizes.values()) <= 2
        assert sorted(sizes) == result["shards"][kind]
        assert all(name.startswith("pretrain-") for name in sizes)  # default prefix: the input's stem
