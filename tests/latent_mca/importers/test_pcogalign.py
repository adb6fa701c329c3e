import json

from .builders import (
    ROLE_SET,
    image_bytes,
    pcog_record,
    read_samples,
    run_shards,
    tar_counts,
    write_file,
    write_records,
)


def test_pcogalign_import(tmp_path):
    root = tmp_path / "v4"
    desk = write_file(root, "HCMAS/desk.png", image_bytes("PNG", seed=1))
    park = write_file(root, "HCMAS/park.webp", image_bytes("WEBP", seed=2))
    write_file(root, "HCMAS/bad.png", b"garbage")
    records = [
        pcog_record("HCMAS/desk.png"),
        pcog_record("HCMAS/desk.png", query="Is this desk too messy?", golden="A little; sort the papers."),
        pcog_record("HCMAS/park.webp", query="Before <image> I ask: fun?", golden="Yes!", id="p-7"),
        pcog_record("HCMAS/park.webp", role_set={"school": 3}),
        pcog_record("HCMAS/park.webp", eval_info=None),
        {**pcog_record("HCMAS/park.webp"), "eval_info": {"location": "home", "EvalHelp": "x"}},
        pcog_record("HCMAS/bad.png"),
        pcog_record("HCMAS/gone.png"),
    ]
    src = write_records(tmp_path / "HCMAS-golden-test.json", records)
    out = tmp_path / "out"
    result = run_shards("--format", "pcogalign", "--input", str(src), "--out", str(out),
                        "--images_root", str(root), "--split", "test_ood")

    assert result["written"] == {"dialogue": 3}
    assert result["skipped"] == {"unknown_role": 1, "malformed_record": 2, "bad_image": 1, "missing_image": 1}
    # Without an id the image path identifies a record; a repeated image is a collision, kept and counted.
    assert result["duplicate_records"] == [{"id": "HCMAS/desk.png", "key": "HCMAS_desk_png_dup1"}]
    report = json.loads((out / "import_report.json").read_text())
    assert {r["id"] for r in report["skipped_records"]} == {"#3", "#4", "#5", "#6", "#7"}

    samples = {s["__key__"]: s for s in read_samples(out / "dialogue")}
    assert set(samples) == {"HCMAS_desk_png", "HCMAS_desk_png_dup1", "p-7"}
    assert samples["HCMAS_desk_png"]["png"] == desk and samples["p-7"]["webp"] == park
    first = samples["HCMAS_desk_png"]["json"]
    assert first["task"] == "pcogalign" and first["split"] == "test_ood" and first["source_id"] == "HCMAS/desk.png"
    assert first["reference"] == "Take a break." and first["role_set"] == ROLE_SET
    assert first["facts"] == {"ImageDesc": "A messy desk.", "EvalHelp": "Be kind and practical.",
                              "location": "school", "role_set": ROLE_SET}
    system, user = first["messages"]
    assert system["role"] == "system" and "Teacher at school" in system["content"]
    assert "Parent at home" in system["content"]
    assert user == {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What should I do now?"}]}
    assert samples["HCMAS_desk_png_dup1"]["json"]["reference"] == "A little; sort the papers."
    assert samples["p-7"]["json"]["messages"][1]["content"] == [
        {"type": "text", "text": "Before"}, {"type": "image"}, {"type": "text", "text": "I ask: fun?"}]
    assert json.loads((out / "dialogue" / "sizes.json").read_text()) == tar_counts(out / "dialogue") == {
        "test_ood-000000.tar": 3}
