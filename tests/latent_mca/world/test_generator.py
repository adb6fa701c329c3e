import json
import re
import time as real_time

import pytest
import webdataset.writer

from latent_mca.cli import main
from latent_mca.world import corpus_texts, generate_world
from tests.latent_mca.world.conftest import SMALL, decode, read_shards, samples_of, small_spec, texts_of

EXPECTED_EXTS = {"paired": {"json", "png"}, "text_only": {"json"}, "dialogue": {"json", "png"}}


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def character_of(record, world_json):
    system = record["messages"][0]["content"]
    names = [c["name"] for c in world_json["characters"] if c["name"] in system]
    assert len(names) <= 1, system
    return names[0] if names else None


def scene_in(text, world_json):
    """(colour, shape, position) named in a text, None for an attribute it does not name exactly once."""
    low = " " + " ".join(re.findall(r"[a-z]+", text.lower())) + " "
    found = []
    for values in (world_json["colours"], world_json["shapes"], world_json["positions"]):
        hits = [v for v in values if f" {v} " in low]
        found.append(hits[0] if len(hits) == 1 else None)
    return tuple(found)


def test_sizes_json_counts_equal_the_samples_in_the_tars(world):
    out, summary, _ = world
    for folder, exts in EXPECTED_EXTS.items():
        shards = read_shards(out / folder)
        sizes = json.loads((out / folder / "sizes.json").read_text())
        assert sizes == {name: len(samples) for name, samples in shards.items()}
        assert all(set(fields) == exts for samples in shards.values() for fields in samples.values())
    assert len(read_shards(out / "paired")) >= 4  # several shards, so 2 ranks x 2 workers all get data
    assert sum(json.loads((out / "paired/sizes.json").read_text()).values()) == summary["paired"] == SMALL["num_paired"]
    assert summary["text_only"] == SMALL["num_text_only"]
    for split, size in (("train", "num_dialogue_train"), ("test_id", "num_test_id"), ("test_ood", "num_test_ood")):
        assert sum(len(s) for s in read_shards(out / "dialogue", split).values()) == SMALL[size]
        assert summary[f"dialogue_{split}"] == SMALL[size]


class _LaterClock:
    """A clock a day ahead: the second run must not depend on when it runs."""

    @staticmethod
    def time():
        return real_time.time() + 86400.0


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(world, tmp_path, monkeypatch):
    out, _, _ = world
    monkeypatch.setattr(webdataset.writer, "time", _LaterClock)
    generate_world(tmp_path / "again", small_spec(), seed=3)
    monkeypatch.undo()
    first, second = all_files(out), all_files(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []
    generate_world(tmp_path / "other", small_spec(), seed=4)
    other = all_files(tmp_path / "other")
    for name in ("paired/train-000000.tar", "text_only/train-000000.tar", "dialogue/test_ood-000000.tar"):
        assert other[name] != first[name]


def test_samples_follow_the_schema(world):
    out, _, _ = world
    ids = []
    for folder in ("paired", "text_only"):
        for key, record, png in samples_of(out / folder):
            assert set(record) == {"id", "source", "messages"} and record["source"] == "synth"
            assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
            user = record["messages"][1]["content"]
            if folder == "paired":
                assert user[0] == {"type": "image"} and user[1]["type"] == "text" and len(user) == 2
            else:
                assert isinstance(user, str) and user.startswith("[Scene: ")
            ids.append(record["id"])
            assert key == record["id"]
    for key, record, png in samples_of(out / "dialogue"):
        assert set(record) == {"id", "messages", "reference", "character", "profile", "task", "split", "facts"}
        assert record["task"] == "roleplay" and record["id"].startswith(record["split"] + "-")
        assert record["messages"][-1]["role"] == "user" and record["messages"][-1]["content"][0] == {"type": "image"}
        assert set(record["profile"]) >= {"name", "introduction", "personality", "experience", "relationship",
                                          "catchphrase"}
        assert record["profile"]["name"] == record["character"] == record["facts"]["character"]
        ids.append(record["id"])
    assert len(ids) == len(set(ids))


def test_ood_characters_only_in_text_only_data_and_test_ood(world):
    out, _, wj = world
    ood, id_chars = set(wj["ood_characters"]), set(wj["id_characters"])
    assert len(ood) == len(id_chars) == SMALL["num_characters"] // 2
    paired_chars = {character_of(r, wj) for _, r, _ in samples_of(out / "paired")} - {None}
    text_chars = {character_of(r, wj) for _, r, _ in samples_of(out / "text_only")} - {None}
    assert paired_chars == id_chars
    assert text_chars == id_chars | ood
    for split, expected in (("train", id_chars), ("test_id", id_chars), ("test_ood", ood)):
        assert {r["character"] for _, r, _ in samples_of(out / "dialogue", split)} <= expected


def test_text_only_covers_scenes_the_images_never_show(world):
    out, _, wj = world
    seen = {tuple(s) for s in wj["paired_scenes"]}
    assert 0 < len(seen) < len(wj["colours"]) * len(wj["shapes"]) * len(wj["positions"])
    paired = {scene_in(r["messages"][2]["content"], wj) for _, r, _ in samples_of(out / "paired")}
    paired = {s for s in paired if None not in s}
    text = {scene_in(r["messages"][1]["content"], wj) for _, r, _ in samples_of(out / "text_only")}
    assert paired and paired <= seen
    assert None not in {x for s in text for x in s}
    assert text - seen, "text-only data must describe scenes that never appear with an image"
    for split in ("train", "test_id"):
        facts = [r["facts"] for _, r, _ in samples_of(out / "dialogue", split)]
        assert {(f["colour"], f["shape"], f["position"]) for f in facts} <= seen


def test_test_prompts_are_disjoint_from_training_prompts(tmp_path):
    # A cramped world (1 ID character, 12 scenes with images: 144 prompts) so any overlap would show.
    spec = small_spec(num_characters=2, paired_scene_fraction=0.1, num_test_id=40, num_dialogue_train=100,
                      num_test_ood=300, num_text_only=400, num_paired=20, image_size=56)
    generate_world(tmp_path, spec, seed=0)
    wj = json.loads((tmp_path / "world.json").read_text())

    def dialogue_prompts(split):
        return {(r["character"], r["messages"][-1]["content"][-1]["text"],
                 (r["facts"]["colour"], r["facts"]["shape"], r["facts"]["position"]))
                for _, r, _ in samples_of(tmp_path / "dialogue", split)}

    train, test_id, test_ood = (dialogue_prompts(s) for s in ("train", "test_id", "test_ood"))
    assert (len(train), len(test_id), len(test_ood)) == (100, 40, 300)  # distinct within each split
    assert not train & test_id
    text_prompts = set()
    for _, r, _ in samples_of(tmp_path / "text_only"):
        char = character_of(r, wj)
        if char is not None:
            question = r["messages"][1]["content"].split("] ", 1)[1]
            text_prompts.add((char, question, scene_in(r["messages"][1]["content"], wj)))
    assert len(text_prompts) > 200
    assert not text_prompts & (test_id | test_ood)


def test_images_show_the_claimed_colour_at_the_claimed_position(world):
    out, _, wj = world
    size = wj["spec"]["image_size"]
    checked = 0
    claims = [(r["facts"]["colour"], r["facts"]["position"], png) for _, r, png in samples_of(out / "dialogue")]
    for _, r, png in samples_of(out / "paired"):
        colour, _, position = scene_in(r["messages"][2]["content"], wj)
        if colour and position:
            claims.append((colour, position, png))
    for colour, position, png in claims:
        image = decode(png)
        assert image.size == (size, size)
        for name, spec in wj["positions"].items():
            x, y = (round(f * size) for f in spec["center"])
            pixel = image.getpixel((x, y))
            if name == position:
                assert pixel == tuple(wj["colours"][colour]), (colour, position, pixel)
            else:
                assert min(pixel) >= 200, f"{name} should show the light background, got {pixel}"
        checked += 1
    assert checked > SMALL["num_test_id"] + SMALL["num_test_ood"]


def test_corpus_covers_every_text_of_every_sample(world):
    out, _, _ = world
    corpus = corpus_texts(3, small_spec())
    assert (out / "corpus.txt").read_text(encoding="utf-8").splitlines() == corpus
    vocab = set(corpus)
    missing = [t for folder in ("paired", "text_only", "dialogue") for _, r, _ in samples_of(out / folder)
               for t in texts_of(r) if t not in vocab]
    assert missing == []
    assert corpus_texts(3, small_spec()) == corpus  # deterministic


def test_refuses_to_mix_worlds_and_overwrite_leaves_no_stale_shards(tmp_path):
    spec = dict(num_paired=20, num_text_only=20, num_dialogue_train=4, num_test_id=2, num_test_ood=2,
                num_characters=4)
    generate_world(tmp_path, small_spec(**spec, samples_per_shard=5), seed=0)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_world(tmp_path, small_spec(**spec, samples_per_shard=10), seed=0)
    generate_world(tmp_path, small_spec(**spec, samples_per_shard=10), seed=0, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "paired").glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    sizes = json.loads((tmp_path / "paired/sizes.json").read_text())
    assert sizes == {"train-000000.tar": 10, "train-000001.tar": 10}
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_too_many_test_prompts_fail_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="test_id"):
        generate_world(tmp_path / "w", small_spec(num_characters=2, num_test_id=10 ** 5),
                       seed=0)
    assert not (tmp_path / "w").exists()


def test_cli_synth_writes_a_world(tmp_path, capsys):
    summary = main(["synth", "--out", str(tmp_path), "--seed", "1", "--num_paired", "12", "--num_text_only", "12",
                    "--num_dialogue_train", "4", "--num_test_id", "2", "--num_test_ood", "3",
                    "--samples_per_shard", "5", "--num_characters", "4", "--image_size", "56"])
    assert summary["paired"] == 12 and summary["dialogue_test_ood"] == 3 and summary["shards"]["paired"] == 3
    assert "test_ood 3" in capsys.readouterr().out
    _, record, png = samples_of(tmp_path / "dialogue", "test_ood")[0]
    assert decode(png).size == (56, 56)
    assert json.loads((tmp_path / "world.json").read_text())["seed"] == 1


def test_cli_help_documents_every_argument(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for arg, doc in (("--num_text_only", "scenes described in words"), ("--image_size", "multiple of 28"),
                     ("--num_characters", "ID")):
        assert arg in text and doc in text
