"""``inspect-codebook``: usage, forced-code token distributions and examples, on a tiny backbone and world."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
import torch
import webdataset as wds

from data_modules.collate import ChatEncoder
from latent_mca.checkpoint import load_phase, save_phase
from latent_mca.cli import main
from latent_mca.models import Backbone
from latent_mca.models.tiny import TinyBackboneSpec, build_tiny_backbone
from latent_mca.world import WorldSpec, corpus_texts, generate_world
from tests.helpers.latent import latent_modules

K = 8
SPEC = WorldSpec(num_paired=16, num_text_only=16, num_dialogue_train=4, num_test_id=2, num_test_ood=2,
                 samples_per_shard=8, image_size=56, num_characters=4)
TINY = TinyBackboneSpec(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, vision_depth=1, vision_hidden_size=32, image_size=56)


def export(path, backbone, phase, perturb=0.0, seed=0):
    torch.manual_seed(seed)
    mods = latent_modules(backbone.hidden_size, num_codes=K)
    if perturb:
        with torch.no_grad():  # make the world model depend on the code
            for p in mods["world_model"].parameters():
                p.add_(torch.randn_like(p) * perturb)
    return save_phase(path, phase, {name: (m, m.config) for name, m in mods.items()}, backbone)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    generate_world(root / "world", SPEC, seed=0)
    path = build_tiny_backbone(root / "backbone", corpus_texts(0, SPEC), TINY, seed=0)
    backbone = Backbone.from_pretrained(str(path))
    export(root / "inverse_dynamics" / "export", backbone, "inverse_dynamics")
    return root, backbone


def labelled_tokens(backbone, folder, count):
    """Assistant-reply tokens of the first ``count`` samples, read with tarfile (independent of the report)."""
    enc = ChatEncoder(backbone.processor, backbone.special_tokens)
    total = 0
    members = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    records = [json.loads(data) for name, data in members if name.endswith(".json")][:count]
    images = [data for name, data in members if name.endswith(".png")]
    from PIL import Image
    for i, record in enumerate(records):
        imgs = [Image.open(io.BytesIO(images[i])).convert("RGB")] if images else []
        total += int((enc.encode(record["messages"], imgs).labels != -100).sum())
    return total


def check_counts(report, positions, max_contexts):
    rows = report["codes"]
    assert [r["code"] for r in rows] == list(range(K)) and report["num_codes"] == K
    assert report["positions"] == positions == sum(r["count"] for r in rows)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert report["contexts"] == min(max_contexts, positions)
    for r in rows:
        assert sum(t["count"] for t in r["forced"]["tokens"]) == report["contexts"]
        assert len(r["examples"]) == min(2, r["count"])
    used = sum(1 for r in rows if r["count"])
    assert report["usage"]["codes_used"] == used
    assert 1.0 <= report["usage"]["perplexity"] <= used + 1e-6


def test_run_directory_report_counts_tables_and_tensorboard(run):
    root, backbone = run
    report = main(["inspect-codebook", "--run", str(root), "--num_samples", "6", "--examples_per_code", "2",
                   "--batch_size", "4", "--max_contexts", "40"])
    assert report["phase"] == "inverse_dynamics" and report["data"] == str(root / "world" / "paired")
    assert report["samples"] == report["image_text_samples"] == 6 and not report["skipped"]
    check_counts(report, labelled_tokens(backbone, root / "world" / "paired", 6), 40)
    # The world model starts as the identity: every code leaves the base model's token unchanged.
    assert all(r["forced"]["base_agreement"] == 1.0 for r in report["codes"])
    assert all(e["emitted"] == e["base"] for r in report["codes"] for e in r["examples"])
    assert report["world_model_accuracy"] == report["base_accuracy"]

    out = root / "codebook_report"
    assert json.loads((out / "codebook_report.json").read_text())["positions"] == report["positions"]
    table = [line for line in (out / "codebook_report.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + K  # header + one row per code
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"histograms": 0, "tensors": 0}).Reload()
    histogram = events.Histograms("codebook/usage")[0].histogram_value
    assert histogram.num == report["positions"] and histogram.min >= 0 and histogram.max <= K - 1
    text = events.Tensors("codebook/report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("# Codebook report") and text.count("\n| ") == 1 + K


def test_latest_export_is_used_and_codes_change_the_emitted_tokens(run, tmp_path):
    root, backbone = run
    shutil.copytree(root / "inverse_dynamics", tmp_path / "inverse_dynamics")
    (tmp_path / "world").symlink_to(root / "world")
    export(tmp_path / "bc" / "export", backbone, "bc", perturb=1.0)
    report = main(["inspect-codebook", "--run", str(tmp_path), "--num_samples", "4", "--examples_per_code", "2",
                   "--max_contexts", "30"])
    assert report["phase"] == "bc"
    check_counts(report, labelled_tokens(backbone, root / "world" / "paired", 4), 30)
    forced = [[t["id"] for t in r["forced"]["tokens"]] for r in report["codes"]]
    assert len({tuple(f) for f in forced}) > 1, "forcing different codes must change the emitted tokens"
    assert min(r["forced"]["base_agreement"] for r in report["codes"]) < 1.0


def test_text_only_data_on_an_export_directory(run, tmp_path):
    root, backbone = run
    report = main(["inspect-codebook", "--run", str(root / "inverse_dynamics" / "export"),
                   "--data", str(root / "world" / "text_only"), "--out", str(tmp_path / "rep"),
                   "--num_samples", "5", "--examples_per_code", "2"])
    assert report["text_only_samples"] == 5 and report["image_text_samples"] == 0
    assert report["text_states"] == "projector"
    check_counts(report, labelled_tokens(backbone, root / "world" / "text_only", 5), 512)
    assert (tmp_path / "rep" / "codebook_report.md").exists()


def test_text_states_follow_the_use_projector_flag_of_the_lineage(run, tmp_path):
    root, backbone = run
    parent = load_phase(export(tmp_path / "inverse_dynamics" / "export", backbone, "inverse_dynamics"))
    meta = json.loads((parent.directory / "phase.json").read_text())
    meta["extra"] = {"use_projector": False}  # trained without the cross-modal projector (an ablation)
    (parent.directory / "phase.json").write_text(json.dumps(meta))
    mods = latent_modules(backbone.hidden_size, num_codes=K)
    save_phase(tmp_path / "bc" / "export", "bc", {n: (m, m.config) for n, m in mods.items()}, backbone,
               parent=load_phase(parent.directory))
    args = ["--data", str(root / "world" / "text_only"), "--num_samples", "2", "--max_contexts", "8"]
    raw = main(["inspect-codebook", "--run", str(tmp_path), "--out", str(tmp_path / "a"), *args])
    assert raw["phase"] == "bc" and raw["text_states"] == "raw"
    projected = main(["inspect-codebook", "--run", str(root), "--out", str(tmp_path / "b"), *args])
    assert projected["text_states"] == "projector"
    assert raw["positions"] == projected["positions"]


def test_bad_samples_are_counted_and_missing_exports_named(run, tmp_path):
    root, _ = run
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(next((root / "world" / "paired").glob("*.tar"))) as tar:
        good = {m.name.partition(".")[2]: tar.extractfile(m).read() for m in tar.getmembers()[:2]}
    with wds.TarWriter(str(data / "mixed-000000.tar")) as sink:
        sink.write({"__key__": "broken", "json": b"{not json"})
        sink.write({"__key__": "badimage", "json": good["json"], "png": b"not a png"})
        sink.write({"__key__": "good", **good})
    report = main(["inspect-codebook", "--run", str(root / "inverse_dynamics" / "export"), "--data", str(data),
                   "--out", str(tmp_path / "rep"), "--num_samples", "3"])
    assert report["samples"] == 1 and report["skipped"] == {"bad_record": 2}
    assert any("broken" in note for note in report["skip_notes"])
    with pytest.raises(FileNotFoundError, match="phase.json"):
        main(["inspect-codebook", "--run", str(tmp_path)])
