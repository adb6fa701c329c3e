"""TokenBlockDataModule: packed token blocks streamed as TextBatch rows, every token a target once."""

from __future__ import annotations

import io
import json
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
import yaml
from lightning.pytorch import LightningModule

from data_modules import TokenBlockDataModule
from latent_mca import cli
from latent_mca.batch import IGNORE_INDEX, TextBatch, next_token_targets
from latent_mca.importers.pack import pack_text
from latent_mca.models.backbone import load_processor
from latent_mca.models.tiny import build_tiny_processor, train_tokenizer
from latent_mca.shards import read_sizes
from latent_mca.token_blocks import BlockFormatError
from tests.helpers.vlm_families import CORPUS

BLOCKS, PER_SAMPLE, PER_SHARD = 16, 2, 2  # 16 blocks -> 8 samples -> 4 shards: one shard per (rank, worker) slot
DOCUMENTS = [f"{a} {b}" for a in CORPUS for b in ("Hello there!", "Where is it?")]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_processor")
    build_tiny_processor(train_tokenizer(CORPUS, 320), 56).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stream(tokenizer_dir):
    """The packed token stream, built from the tokenizer directly: each document's ids, then EOS."""
    tok = load_processor(tokenizer_dir).tokenizer
    ids = []
    for doc in DOCUMENTS:
        ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids


def pack(tokenizer_dir, out, documents, seq_len, per_sample=PER_SAMPLE, per_shard=PER_SHARD):
    src = out.parent / f"{out.name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return pack_text(str(src), str(tokenizer_dir), str(out), seq_len=seq_len, blocks_per_sample=per_sample,
                     samples_per_shard=per_shard)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tokenizer_dir, stream):
    """A pack of exactly 16 blocks: seq_len is chosen from the stream's length."""
    seq_len = (len(stream) - 1) // BLOCKS
    assert seq_len > 15, "the corpus must be long enough that the 16th block is the last full one"
    out = tmp_path_factory.mktemp("pack") / "text"
    info = pack(tokenizer_dir, out, DOCUMENTS, seq_len)
    assert (info["blocks"], info["samples"], len(info["shards"])) == (BLOCKS, 8, 4)
    return out, seq_len


def module(train, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 0)
    kw.setdefault("batch_size", 4)
    return TokenBlockDataModule(train=str(train), **kw)


def block_index(key):
    """Global block index of a row key ``<sample key>/<block>``."""
    sample, block = key.split("/")
    return int(sample) * PER_SAMPLE + int(block)


def target_positions(batch, seq_len, stream):
    """Stream positions whose tokens this batch scores as next-token targets (checking the token ids)."""
    targets = next_token_targets(batch.text.labels)  # (N, L + 1)
    positions = []
    for row, key in enumerate(batch.keys):
        for t in (targets[row] != IGNORE_INDEX).nonzero().flatten().tolist():
            pos = block_index(key) * seq_len + t + 1
            assert int(targets[row, t]) == stream[pos]
            positions.append(pos)
    return positions


# ---------------------------------------------------------------------------------------------- rows


def test_rows_are_whole_blocks_with_labels_aligned_to_inputs(packed, stream):
    out, seq_len = packed
    dm = module(out)
    dm.setup("fit")
    assert (dm.seq_len, dm.eos_token_id) == (seq_len, stream[-1])
    batches = list(dm.make_loader("train", 0, 1))
    assert len(batches) == 4  # 8 samples of 2 blocks, 4 rows per batch
    for batch in batches:
        ids, text = batch.text.input_ids, batch.text
        assert isinstance(batch, TextBatch) and text.vision == {}
        assert ids.shape == (4, seq_len + 1) and ids.dtype == torch.long and text.labels.dtype == torch.long
        assert text.attention_mask.dtype == torch.long and bool((text.attention_mask == 1).all())
        assert torch.equal(text.labels[:, 1:], ids[:, 1:]) and bool((text.labels[:, 0] == IGNORE_INDEX).all())
        for row, key in enumerate(batch.keys):
            start = block_index(key) * seq_len
            assert ids[row].tolist() == stream[start: start + seq_len + 1]


def test_every_token_is_a_target_once_across_two_ranks_and_two_workers(packed, stream):
    out, seq_len = packed
    dm = module(out, num_workers=2, shuffle_buffer=4)
    dm.setup("fit")
    loaders = [dm.make_loader("train", rank, 2) for rank in range(2)]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == 2
    positions = Counter(p for rank in batches for b in rank for p in target_positions(b, seq_len, stream))
    assert positions == Counter(range(1, BLOCKS * seq_len + 1))


def test_validation_padding_rows_score_nothing(packed, stream):
    out, seq_len = packed
    dm = TokenBlockDataModule(train=str(out), val=str(out), batch_size=4, num_workers=0)
    dm.setup("validate")
    batches = [b for rank in range(3) for b in dm.make_loader("val", rank, 3)]
    # 4 shards over 3 ranks: one rank reads 2 shards, the others pad their second batch with a repeat.
    assert sum(bool((b.text.labels == IGNORE_INDEX).all()) for b in batches) == 2
    positions = Counter(p for b in batches for p in target_positions(b, seq_len, stream))
    assert positions == Counter(range(1, BLOCKS * seq_len + 1))


def test_batch_size_counts_blocks_and_must_be_a_multiple_of_blocks_per_sample(packed):
    out, seq_len = packed
    dm = module(out, batch_size=6)
    dm.setup("fit")
    # 3 samples of 2 blocks per batch; ceil(8 / 3) batches, the third completed from the slot's next pass
    assert [b.text.input_ids.shape[0] for b in dm.make_loader("train", 0, 1)] == [6, 6, 6]
    with pytest.raises(ValueError, match="multiple of the 2 blocks per sample"):
        module(out, batch_size=3).setup("fit")


# ---------------------------------------------------------------------------------------------- bad data


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for key, blocks in samples:
            sink.write({"__key__": key, "tokens.npy": blocks})


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_corrupt_and_mis_sized_samples_are_skipped_and_counted(tmp_path, packed, tokenizer_dir):
    out, seq_len = packed
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    names = sorted(read_sizes(bad))
    good = np.zeros((PER_SAMPLE, seq_len + 1), np.uint16)
    vocab = json.loads((bad / "pack_info.json").read_text())["vocab_size"]
    damaged = {names[0]: b"not an npy array", names[1]: npy(good[:, :-1]), names[2]: npy(good + vocab)}
    for index, name in enumerate(names[:3]):
        write_shard(bad / name, [(f"{2 * index:012d}", damaged[name]), (f"{2 * index + 1:012d}", npy(good))])
    dm = module(bad)
    dm.setup("fit")
    keys = [k for batch in dm.make_loader("train", 0, 1) for k in batch.keys]
    assert sorted(k.split("/")[0] for k in keys) == sorted(f"{i:012d}" for i in (1, 1, 3, 3, 5, 5, 6, 6, 7, 7))
    assert dm.skip_counts == {"bad_blocks": 1, "block_length": 1, "token_out_of_vocab": 1}
    assert {name.rsplit("#", 1)[1] for _, name in dm.skipped_samples} == {f"{i:012d}" for i in (0, 2, 4)}


def test_missing_or_incomplete_pack_info_fails_naming_the_directory(tmp_path, packed):
    out, _ = packed
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "pack_info.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(bare))}.*pack_info.json"):
        module(bare).setup("fit")
    info = json.loads((out / "pack_info.json").read_text())
    (bare / "pack_info.json").write_text(json.dumps({**info, "complete": False}))
    with pytest.raises(BlockFormatError, match=f"{re.escape(str(bare))}.*incomplete"):
        module(bare).setup("fit")


def test_several_packs_need_one_sequence_length_and_get_unique_keys(tmp_path, packed, tokenizer_dir):
    out, seq_len = packed
    other = tmp_path / "other"
    pack(tokenizer_dir, other, DOCUMENTS[:12], seq_len)
    dm = TokenBlockDataModule(train=[str(out), str(other)], batch_size=4, num_workers=0, shuffle_buffer=0)
    dm.setup("fit")
    keys = [k for batch in dm.make_loader("train", 0, 1) for k in batch.keys]
    assert len(set(keys)) == len(keys) and {k.split("/")[0] for k in keys} == {"text", "other"}
    longer = tmp_path / "longer"
    pack(tokenizer_dir, longer, DOCUMENTS[:12], seq_len + 1)
    with pytest.raises(ValueError, match="differ in .*seq_len"):
        TokenBlockDataModule(train=[str(out), str(longer)], num_workers=0).setup("fit")


# ---------------------------------------------------------------------------------------------- fit


class TinyBlockLM(LightningModule):
    """A bigram model over packed rows; records the shape of every training batch."""

    def __init__(self, vocab_size: int = 512, hidden: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, hidden)
        self.head = torch.nn.Linear(hidden, vocab_size)
        self.shapes: list[tuple[int, ...]] = []

    def training_step(self, batch: TextBatch, batch_idx: int) -> torch.Tensor:
        self.shapes.append(tuple(batch.text.input_ids.shape))
        logits = self.head(self.embed(batch.text.input_ids))  # (B, L + 1, V)
        targets = next_token_targets(batch.text.labels)  # (B, L + 1)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_through_the_cli(tmp_path, packed):
    out, seq_len = packed
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": f"{__name__}.TinyBlockLM"},
        "data": {"class_path": "data_modules.TokenBlockDataModule",
                 "init_args": {"train": str(out), "batch_size": 4, "num_workers": 0}},
        "trainer": {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path)},
    }))
    run = cli.main(["fit", "--config", str(config)])
    assert run.trainer.global_step == 2
    assert run.model.shapes == [(4, seq_len + 1)] * 2
