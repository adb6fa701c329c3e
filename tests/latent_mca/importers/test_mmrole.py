import json

import pytest

from .builders import (
    PROFILE,
    image_bytes,
    mmrole_record,
    read_samples,
    run_shards,
    tar_counts,
    write_file,
    write_records,
)

DIALOGUE = [("user", "<image>\nWhat do you think of this?"), ("assistant", "Colours sing! A bold red."),
            ("user", "Would you paint it?"), ("assistant", "Gladly, with my widest brush."),
            ("user", "A trailing question nobody answered.")]


@pytest.fixture()
def mmrole_import(tmp_path):
    root = tmp_path / "images"
    good = write_file(root, "coco/1.jpg", image_bytes("JPEG", seed=1))
    other = write_file(root, "coco/2.png", image_bytes("PNG", seed=2))
    records = [
        mmrole_record("d1", "coco/1.jpg", DIALOGUE),
        mmrole_record("d2", "coco/2.png", [("user", "Hi"), ("assistant", "Hello there.")], role="Bob",
                      profiles={"Bob": "Bob is a grumpy baker."}),
        mmrole_record("d1", "coco/2.png", [("user", "Again?"), ("assistant", "Again.")]),  # duplicate id
        mmrole_record("narr", "coco/1.jpg", [("user", "Hi"), ("narrator", "..."), ("assistant", "Yes.")]),
        mmrole_record("noprof", "coco/1.jpg", [("user", "Hi"), ("assistant", "Yo.")], profiles={"Carol": PROFILE}),
        mmrole_record("quiet", "coco/1.jpg", [("user", "Hi")]),
        mmrole_record("first", "coco/1.jpg", [("assistant", "I speak first."), ("user", "ok")]),
        mmrole_record("noimg", "coco/missing.jpg", [("user", "Hi"), ("assistant", "Yo.")]),
        {"id": "noconv", "image_path": "coco/1.jpg", "character_role": "Alice"},
    ]
    src = write_records(tmp_path / "mmrole.jsonl", records, jsonl=True, extra_lines=("{not json",))
    out = tmp_path / "out"
    result = run_shards("--format", "mmrole", "--input", str(src), "--out", str(out), "--images_root", str(root),
                        "--split", "test_id", "--samples_per_shard", "3")
    return result, out, {"coco/1.jpg": good, "coco/2.png": other}


def test_counts_and_report(mmrole_import):
    result, out, _ = mmrole_import
    assert result["records"] == 10
    assert result["written"] == {"dialogue": 4}
    assert result["skipped"] == {"unknown_role": 1, "missing_profile": 1, "no_assistant_turn": 1,
                                 "malformed_record": 2, "missing_image": 1, "bad_json": 1}
    reasons = {r["id"]: r["reason"] for r in json.loads((out / "import_report.json").read_text())["skipped_records"]}
    assert reasons == {"narr": "unknown_role", "noprof": "missing_profile", "quiet": "no_assistant_turn",
                       "first": "malformed_record", "noimg": "missing_image", "noconv": "malformed_record",
                       "line 10": "bad_json"}
    assert result["duplicate_ids"] == 1


def test_one_sample_per_turn_pair_with_history(mmrole_import):
    _, out, images = mmrole_import
    samples = {s["__key__"]: s for s in read_samples(out / "dialogue")}
    assert set(samples) == {"d1_t0", "d1_t1", "d2_t0", "d1_t0_dup1"}
    assert samples["d1_t0"]["jpg"] == images["coco/1.jpg"] and samples["d1_t1"]["jpg"] == images["coco/1.jpg"]
    assert samples["d2_t0"]["png"] == images["coco/2.png"]

    first, second = samples["d1_t0"]["json"], samples["d1_t1"]["json"]
    for sample in (first, second):
        assert sample["task"] == "mmrole" and sample["split"] == "test_id" and sample["source_id"] == "d1"
        assert sample["character"] == "Alice" and sample["profile"] == PROFILE
        assert sample["facts"] == {"character_role": "Alice", "character_profile": PROFILE}
        system, user = sample["messages"]
        assert system["role"] == "system" and isinstance(system["content"], str)
        assert "Alice" in system["content"] and all(v in system["content"] for v in PROFILE.values())
        assert user["role"] == "user" and user["content"][0] == {"type": "image"}
        assert [item["type"] for item in user["content"]] == ["image", "text"]
    assert first["reference"] == "Colours sing! A bold red."
    assert second["reference"] == "Gladly, with my widest brush."
    first_text, second_text = first["messages"][1]["content"][1]["text"], second["messages"][1]["content"][1]["text"]
    assert "What do you think of this?" in first_text and "<image>" not in first_text
    assert "Colours sing" not in first_text  # the reply being predicted is not in its own context
    # The second turn's context carries the first exchange, with speaker names, then its question.
    assert "[human]: What do you think of this?" in second_text and "[Alice]: Colours sing! A bold red." in second_text
    assert second_text.index("Colours sing") < second_text.index("Would you paint it?")
    assert "widest brush" not in second_text


def test_string_profile_and_duplicates(mmrole_import):
    _, out, _ = mmrole_import
    samples = {s["__key__"]: s["json"] for s in read_samples(out / "dialogue")}
    assert samples["d2_t0"]["profile"] == "Bob is a grumpy baker."
    assert "Bob is a grumpy baker." in samples["d2_t0"]["messages"][0]["content"]
    assert samples["d1_t0_dup1"]["reference"] == "Again." and samples["d1_t0_dup1"]["source_id"] == "d1"
    assert len({s["id"] for s in samples.values()}) == 4


def test_shards_are_named_after_the_split(mmrole_import):
    result, out, _ = mmrole_import
    sizes = json.loads((out / "dialogue" / "sizes.json").read_text())
    assert sizes == tar_counts(out / "dialogue") == {"test_id-000000.tar": 3, "test_id-000001.tar": 1}
    assert result["shards"] == {"dialogue": ["test_id-000000.tar", "test_id-000001.tar"]}
