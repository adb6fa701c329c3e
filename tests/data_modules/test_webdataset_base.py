"""StreamingDataModule: slot splitting, equal batch counts, exact resume, skip accounting, DDP."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from data_modules import SampleError, ShardSource, SkipCountLogger, StreamingDataModule
from data_modules.streaming import expand_shards, resolve_source, train_plan
from tests.data_modules.shard_fixtures import IMAGE_SIZE, shard_name, truncate, write_shards

HERE = Path(__file__).parent


class ToyData(StreamingDataModule):
    """Decodes PNG + JSON into small tensors; counts decode calls made in this process."""

    decode_calls = 0

    def decode_item(self, sample):
        ToyData.decode_calls += 1
        doc = self.sample_json(sample)
        if "value" not in doc:
            raise SampleError("missing_value", "json has no 'value'")
        image = torch.from_numpy(np.array(self.sample_image(sample))).permute(2, 0, 1).float() / 255
        return sample["__key__"], image, doc["value"], sample["__source__"], sample["__repeat__"]

    def collate(self, items):
        keys, images, values, sources, repeats = zip(*items)
        return {"keys": list(keys), "images": torch.stack(images), "values": torch.tensor(values),  # (B, 3, H, W)
                "sources": list(sources), "repeats": list(repeats)}


class ToyModule(LightningModule):
    """Records the keys of every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []
        self.epochs: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["keys"])
        self.epochs.append(self.current_epoch)
        return (self.w * batch["images"].mean() - batch["values"].float().mean()).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def toy(train=None, val=None, **kw) -> ToyData:
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 5)
    return ToyData(train=train, val=val, **kw)


def src(path, batch_size=3, **kw) -> ShardSource:
    return ShardSource(str(path), batch_size=batch_size, **kw)


def epoch_keys(dm: ToyData, split: str, rank: int, world: int, epochs: int = 1) -> list[list[list[str]]]:
    loader = dm.make_loader(split, rank, world)
    return [[batch["keys"] for batch in loader] for _ in range(epochs)]


def fit(dm: ToyData, max_steps: int, ckpt_in=None, ckpt_out=None, **trainer_kw) -> tuple[ToyModule, Trainer]:
    model = ToyModule()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **trainer_kw)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_in)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    return model, trainer


# ---------------------------------------------------------------------------------------------- slots


def test_two_ranks_two_workers_partition_an_epoch(tmp_path):
    keys = write_shards(tmp_path, [6] * 8)
    dm = toy(train={"a": src(tmp_path)}, num_workers=2)
    dm.setup("fit")
    seen = [k for rank in range(2) for batch in epoch_keys(dm, "train", rank, 2)[0] for k in batch]
    # 48 samples, 3 per batch, 2 ranks x 2 workers: every slot owns 2 whole shards, one epoch = one pass.
    assert Counter(seen) == Counter(keys)


def test_uneven_shards_give_equal_full_batches_and_disjoint_ranks(tmp_path):
    write_shards(tmp_path, [7, 3, 11, 5, 1])
    dm = toy(train={"a": src(tmp_path)}, num_workers=2)
    dm.setup("fit")
    per_rank = [epoch_keys(dm, "train", rank, 2, epochs=2) for rank in range(2)]
    # ceil(27 / (3 * 2)) = 5 batches per rank, rounded up to a multiple of 2 workers.
    for epoch in range(2):
        assert [len(per_rank[r][epoch]) for r in range(2)] == [6, 6]
        assert all(len(batch) == 3 for r in range(2) for batch in per_rank[r][epoch])
        ranks = [{k for batch in per_rank[r][epoch] for k in batch} for r in range(2)]
        assert not ranks[0] & ranks[1]


def test_fewer_shards_than_slots_still_disjoint(tmp_path):
    keys = write_shards(tmp_path, [6, 6, 6])
    dm = toy(train={"a": src(tmp_path, batch_size=2)}, num_workers=2, shuffle_buffer=0)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="fewer shards"):
        loaders = [dm.make_loader("train", rank, 2) for rank in range(2)]
    slots = [[k for b in loader for k in b["keys"]] for loader in loaders]
    assert len(slots[0]) == len(slots[1])
    assert not set(slots[0]) & set(slots[1])
    assert set(slots[0]) | set(slots[1]) <= set(keys)


def test_shard_permutation_changes_per_epoch_and_is_identical_on_every_rank(tmp_path):
    write_shards(tmp_path, [6] * 8)
    source = resolve_source("a", src(tmp_path))
    plans = [train_plan(source, seed=3, epoch=e, n_slots=4) for e in range(4)]
    assert len({tuple(p.url for p in plan[0]) for plan in plans}) > 1  # slot 0's shards move between epochs
    dm = toy(train={"a": src(tmp_path)}, num_workers=2, seed=3)
    dm.setup("fit")
    shard_of = lambda key: key.rsplit("_", 1)[0]  # noqa: E731
    per_rank = [epoch_keys(dm, "train", rank, 2, epochs=3) for rank in range(2)]
    rank0_shards = []
    for epoch in range(3):
        shards = [{shard_of(k) for batch in per_rank[r][epoch] for k in batch} for r in range(2)]
        # Both ranks derived the same permutation: together they read each shard once, never the same one.
        assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 8
        rank0_shards.append(frozenset(shards[0]))
    assert len(set(rank0_shards)) > 1


def test_validation_reads_every_sample_once_with_equal_counts(tmp_path):
    keys = write_shards(tmp_path, [7, 3, 11, 5, 1])
    dm = toy(val={"a": src(tmp_path, batch_size=4)}, num_workers=2)
    dm.setup("validate")
    batches = [list(dm.make_loader("val", rank, 2)) for rank in range(2)]
    assert len(batches[0]) == len(batches[1]) == len(dm.make_loader("val", 0, 2))
    real = [k for rank in batches for b in rank for k, rep in zip(b["keys"], b["repeats"]) if not rep]
    assert Counter(real) == Counter(keys)
    again = [b["keys"] for b in dm.make_loader("val", 0, 2)]
    assert again == [b["keys"] for b in batches[0]]  # deterministic


def test_validation_reports_samples_that_sizes_json_did_not_count(tmp_path):
    keys = write_shards(tmp_path, [5, 5])
    (tmp_path / "sizes.json").write_text(json.dumps({shard_name("train", 0): 5, shard_name("train", 1): 2}))
    dm = toy(val={"a": src(tmp_path, batch_size=2)})
    dm.setup("validate")
    seen = {k for b in dm.make_loader("val", 0, 1) for k in b["keys"]}
    unseen = {name.split("#")[1] for reason, name in dm.skipped_samples if reason == "beyond_sizes_json"}
    assert unseen and seen | unseen == set(keys) and not seen & unseen


def test_sources_share_every_batch_in_ratio(tmp_path):
    write_shards(tmp_path / "p", [5, 5, 5, 5], prefix="p")
    write_shards(tmp_path / "t", [9, 9], prefix="t")
    dm = toy(train={"paired": src(tmp_path / "p", 2), "text": src(tmp_path / "t", 1)}, num_workers=2)
    dm.setup("fit")
    loader = dm.make_loader("train", 0, 1)
    batches = list(loader)
    assert len(batches) == 18  # text: 18 samples at 1 per batch is the longer source
    assert all(b["sources"] == ["paired", "paired", "text"] for b in batches)


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_workers,sources", [(2, "one"), (3, "two")])
def test_loader_resumes_at_any_batch_and_decodes_only_what_it_yields(tmp_path, num_workers, sources):
    write_shards(tmp_path / "p", [7, 3, 11, 5, 1], prefix="p")
    write_shards(tmp_path / "t", [4, 4, 4], prefix="t")
    train = {"paired": src(tmp_path / "p", 2)}
    if sources == "two":
        train["text"] = src(tmp_path / "t", 1)
    dm = toy(train=train, num_workers=num_workers)
    dm.setup("fit")
    full = [b["keys"] for b in dm.make_loader("train", 1, 2, position=lambda: (4, 0))]
    for consumed in sorted({1, 2, 3, len(full) // 2, len(full) - 1}):  # every logical-worker offset
        got = [b["keys"] for b in dm.make_loader("train", 1, 2, position=lambda: (4, consumed))]
        assert got == full[consumed:]
    in_process = toy(train=train, num_workers=0)
    in_process.setup("fit")
    ToyData.decode_calls = 0
    rest = list(in_process.make_loader("train", 0, 1, position=lambda: (0, 5)))
    assert ToyData.decode_calls == sum(len(b["keys"]) for b in rest)  # skipped batches were never decoded


@pytest.mark.parametrize("stop_at,accumulate,persistent", [(4, 1, False), (9, 1, True), (2, 2, False)])
def test_lightning_resume_matches_a_straight_run(tmp_path, stop_at, accumulate, persistent):
    write_shards(tmp_path / "shards", [7, 3, 11, 5, 1])
    make = lambda: toy(train={"a": src(tmp_path / "shards", 4)}, num_workers=2, persistent_workers=persistent)  # noqa
    # 27 samples / 4 = 7 batches per epoch, rounded to 8 (2 workers, accumulation 2): crosses an epoch.
    total = 10 // accumulate + 1
    straight, _ = fit(make(), total, accumulate_grad_batches=accumulate)
    ckpt = tmp_path / "k.ckpt"
    first, _ = fit(make(), stop_at, ckpt_out=ckpt, accumulate_grad_batches=accumulate)
    resumed, _ = fit(make(), total, ckpt_in=ckpt, accumulate_grad_batches=accumulate)
    assert first.seen + resumed.seen == straight.seen
    assert len(straight.seen) > 8


def test_resume_with_other_settings_warns(tmp_path):
    write_shards(tmp_path / "shards", [6, 6])
    ckpt = tmp_path / "k.ckpt"
    fit(toy(train={"a": src(tmp_path / "shards", 2)}), 2, ckpt_out=ckpt)
    with pytest.warns(UserWarning, match="different data settings"):
        fit(toy(train={"a": src(tmp_path / "shards", 2)}, seed=1), 4, ckpt_in=ckpt)


# ---------------------------------------------------------------------------------------------- errors


def test_corrupt_samples_and_truncated_tar_are_skipped_counted_and_named(tmp_path):
    shards = tmp_path / "shards"
    damage = {"train_000_002": {"png": b"\x89PNG\r\n\x1a\nnot really"}, "train_001_001": {"json": b"{nope"}}
    keys = write_shards(shards, [4, 4, 30], damage=damage)
    truncate(shards / shard_name("train", 2), keep=0.5)
    dm = toy(train={"a": src(shards, 2)}, num_workers=2, shuffle_buffer=0, error_log_every=1)
    model, trainer = fit(dm, 19)  # 38 samples / 2 = 19 batches: one epoch
    counts = dm.skip_counts
    assert counts["bad_image"] >= 1 and counts["bad_json"] >= 1 and counts["bad_tar"] >= 1
    names = dict((name, reason) for reason, name in dm.skipped_samples)
    bad_url = str(shards / shard_name("train", 0))
    assert names[f"{bad_url}#train_000_002"] == "bad_image"
    assert names[f"{shards / shard_name('train', 1)}#train_001_001"] == "bad_json"
    assert names[str(shards / shard_name("train", 2))] == "bad_tar"
    seen = {k for batch in model.seen for k in batch}
    assert set(keys[:8]) - seen == {"train_000_002", "train_001_001"}  # the rest of the run went on
    assert trainer.callback_metrics["data/skipped_bad_image"] >= 1
    assert any(isinstance(cb, SkipCountLogger) for cb in trainer.callbacks)


def test_a_shard_missing_at_read_time_is_counted(tmp_path):
    write_shards(tmp_path, [4, 4, 4, 4])
    dm = toy(train={"a": src(tmp_path, 2)}, shuffle_buffer=0)
    dm.setup("fit")
    loader = dm.make_loader("train", 0, 1)
    os.remove(tmp_path / shard_name("train", 1))
    assert len(list(loader)) == 8
    assert dm.skip_counts["missing_shard"] >= 1
    assert ("missing_shard", str(tmp_path / shard_name("train", 1))) in dm.skipped_samples


def test_setup_names_missing_and_empty_shard_locations(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        toy(train={"a": src(tmp_path / "empty")}).setup("fit")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        toy(train={"a": src(tmp_path / "nowhere")}).setup("fit")
    write_shards(tmp_path / "unsized", [2])
    os.remove(tmp_path / "unsized" / "sizes.json")
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        toy(train={"a": src(tmp_path / "unsized")}).setup("fit")
    write_shards(tmp_path / "s", [3, 3, 3])
    os.remove(tmp_path / "s" / shard_name("train", 1))
    with pytest.raises(FileNotFoundError, match=shard_name("train", 1)):
        toy(train={"a": src(tmp_path / "s")}).setup("fit")
    dm = toy(train={"a": src(tmp_path / "s")}, missing_shards="skip")
    dm.setup("fit")
    assert dm.skip_counts == {"missing_shard": 1}
    assert len(dm.resolve("train")[0].urls) == 2 and dm.resolve("train")[0].samples == 6


def test_shard_specs_brace_glob_list_and_remote(tmp_path):
    write_shards(tmp_path, [2, 2, 2, 2])
    brace = expand_shards(f"{tmp_path}/train-{{000000..000002}}.tar")
    assert [Path(u).name for u in brace] == [shard_name("train", i) for i in range(3)]
    assert expand_shards(str(tmp_path / "train-*.tar")) == expand_shards(str(tmp_path))
    assert len(expand_shards([brace[0], str(tmp_path / "train-00000[23].tar")])) == 3
    assert resolve_source("x", src(f"{tmp_path}/train-{{000000..000001}}.tar")).samples == 4
    with pytest.raises(ValueError, match="samples_per_epoch"):
        resolve_source("x", src("pipe:cat a.tar"))
    assert resolve_source("x", src("pipe:cat a.tar", samples_per_epoch=10)).samples == 10


# ---------------------------------------------------------------------------------------------- plumbing


def test_worker_copy_pickles_without_the_trainer(tmp_path):
    write_shards(tmp_path, [3])
    dm = toy(train={"a": src(tmp_path)})
    dm.trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    dm.setup("fit")
    dataset = dm.make_loader("train", 0, 1).pipeline
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.hooks.trainer is None and dm.trainer is not None
    assert [b["keys"] for b, _ in clone] == [b["keys"] for b, _ in dataset]


def test_yaml_config_maps_onto_init(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ToyData, "data")
    cfg = parser.parse_string(json.dumps({"data": {
        "train": {"paired": {"shards": "d/{000..003}.tar", "batch_size": 4},
                  "text": {"shards": ["a", "b"], "batch_size": 2, "samples_per_epoch": 9}},
        "num_workers": 3, "seed": 7}}))
    dm = parser.instantiate(cfg).data
    assert dm.sources["train"]["text"] == ShardSource(["a", "b"], 2, 9) and dm.num_workers == 3


@pytest.mark.slow
def test_ddp_two_processes_disjoint_keys_and_equal_steps(tmp_path):
    keys = write_shards(tmp_path / "shards", [7, 3, 11, 5, 1, 9, 4, 8], damage={"train_002_003": {"png": b"bad"}})
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(HERE / "ddp_streaming_script.py"), str(tmp_path / "shards"), str(out)],
                         timeout=240, capture_output=True, text=True, cwd=HERE.parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == ranks[0]["expected"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"]
    for epoch in range(2):
        sets = [{k for b in r["batches"] if b["epoch"] == epoch for k in b["keys"]} for r in ranks]
        assert sets[0] and sets[1] and not sets[0] & sets[1] and sets[0] | sets[1] <= set(keys)
    assert IMAGE_SIZE == ranks[0]["image_size"]
    # Skip counts are summed over ranks before logging: both ranks log the same total.
    total = sum(r["skip_counts"].get("bad_image", 0) for r in ranks)
    assert total >= 1
    assert ranks[0]["logged"]["data/skipped_bad_image"] == ranks[1]["logged"]["data/skipped_bad_image"] == total
