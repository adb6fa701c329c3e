import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from latent_mca import cli
from latent_mca.importers.pack import BAD_MESSAGES, Document, Encoder, Skip
from latent_mca.models.backbone import load_processor
from latent_mca.models.tiny import build_tiny_processor, train_tokenizer
from latent_mca.shards import ShardSink
from latent_mca.token_blocks import BlockFormatError, decode_block_sample, join_blocks, read_pack_info, sample_key
from tests.helpers.vlm_families import CORPUS

CONVERSATION = [{"role": "user", "content": "What do you see?"},
                {"role": "assistant", "content": [{"type": "text", "text": "I see a red circle."}]}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_processor")
    build_tiny_processor(train_tokenizer(CORPUS, 320), 56).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    return load_processor(tokenizer_dir)


def expected_stream(processor, documents, eos_id=None):
    """The spec, straight from the processor: each document's ids then the end-of-document id."""
    tok = processor.tokenizer
    eos_id = tok.eos_token_id if eos_id is None else eos_id
    stream = []
    for doc in documents:
        text = doc if isinstance(doc, str) else processor.apply_chat_template(doc, tokenize=False)
        stream += tok(text, add_special_tokens=False)["input_ids"] + [eos_id]
    return stream


def pack(tokenizer_dir, out, *inputs, seq_len=8, per_sample=3, per_shard=2, extra=()):
    args = ["pack-text", "--tokenizer", str(tokenizer_dir), "--out", str(out), "--seq_len", str(seq_len),
            "--blocks_per_sample", str(per_sample), "--samples_per_shard", str(per_shard)]
    for path in inputs:
        args += ["--input+", str(path)]
    return cli.main(args + list(extra))


def read_pack(out):
    """(key, shard name, blocks) of every sample, shards in name order."""
    urls = sorted(str(p) for p in out.glob("*.tar"))
    samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    return [(s["__key__"], s["__url__"].rsplit("/", 1)[-1], decode_block_sample(s, read_pack_info(out)["seq_len"]))
            for s in samples]


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture
def corpus(tmp_path):
    """A JSONL, a TXT and a text-only shard, and the documents they hold in reading order."""
    records = [{"text": "Hello there!"}, {"messages": CONVERSATION},
               {"text": "I see a blue square at the center.", "id": "x"}]
    jsonl = write_jsonl(tmp_path / "a.jsonl", records)
    txt = tmp_path / "b.txt"
    txt.write_text("Where is it?\nAt the top left.\n\n\nI see a green circle.\n")
    with ShardSink(tmp_path / "shards", "train", 10) as sink:
        sink.write("s0", {"json": {"messages": CONVERSATION[:1], "id": "s0"}})
        sink.write("s1", {"json": {"text": "What do you see?"}})
    documents = ["Hello there!", CONVERSATION, "I see a blue square at the center.",
                 "Where is it?\nAt the top left.", "I see a green circle.", CONVERSATION[:1], "What do you see?"]
    return [jsonl, txt, tmp_path / "shards" / "train-000000.tar"], documents


def test_blocks_concatenate_to_the_tokenised_documents_with_eos(tmp_path, tokenizer_dir, processor, corpus):
    inputs, documents = corpus
    info = pack(tokenizer_dir, tmp_path / "out", *inputs)
    stream = expected_stream(processor, documents)
    samples = read_pack(tmp_path / "out")
    n_blocks = (len(stream) - 1) // 8
    assert [key for key, _, _ in samples] == [sample_key(i) for i in range(len(samples))]
    assert all(blocks.shape == (3, 9) for _, _, blocks in samples[:-1])
    joined = join_blocks(torch.cat([blocks for _, _, blocks in samples]))
    assert joined.tolist() == stream[: n_blocks * 8 + 1]
    assert (info["documents"], info["tokens"], info["blocks"]) == (7, len(stream), n_blocks)
    assert info["dropped_tail_tokens"] == len(stream) - (n_blocks * 8 + 1)
    assert info["skipped_total"] == 0 and not (tmp_path / "out" / "pack_skipped.jsonl").exists()


def test_sizes_and_pack_info_describe_the_shards(tmp_path, tokenizer_dir, processor, corpus):
    inputs, _ = corpus
    out = tmp_path / "out"
    pack(tokenizer_dir, out, *inputs)
    samples = read_pack(out)
    per_shard, blocks_per_shard = {}, {}
    for _, shard, blocks in samples:
        per_shard[shard] = per_shard.get(shard, 0) + 1
        blocks_per_shard[shard] = blocks_per_shard.get(shard, 0) + blocks.shape[0]
    assert json.loads((out / "sizes.json").read_text()) == per_shard
    assert all(n <= 2 for n in per_shard.values()) and len(per_shard) >= 2
    info = read_pack_info(out)
    assert info["shards"] == {s: {"samples": per_shard[s], "blocks": blocks_per_shard[s]} for s in per_shard}
    assert (info["samples"], info["blocks"]) == (len(samples), sum(blocks_per_shard.values()))
    tok = processor.tokenizer
    assert (info["seq_len"], info["block_len"], info["dtype"]) == (8, 9, "uint16")
    assert (info["vocab_size"], info["eos_token_id"], info["eos_token"]) == (len(tok), tok.eos_token_id, tok.eos_token)
    assert info["tokenizer"] == str(tokenizer_dir) and info["inputs"] == [str(p) for p in inputs]
    assert info["last_sample_blocks"] == samples[-1][2].shape[0]


def test_dropped_tail_is_counted(tmp_path, tokenizer_dir, processor):
    src = write_jsonl(tmp_path / "one.jsonl", [{"text": "I see a red circle at the top left."}])
    total = len(expected_stream(processor, ["I see a red circle at the top left."]))
    info = pack(tokenizer_dir, tmp_path / "out", src, seq_len=total - 3, per_sample=4)
    assert (info["blocks"], info["samples"], info["dropped_tail_tokens"]) == (1, 1, 2)
    (_, _, blocks), = read_pack(tmp_path / "out")
    assert blocks.shape == (1, total - 2)


def test_too_little_text_for_one_block_writes_no_shard(tmp_path, tokenizer_dir, capsys):
    src = write_jsonl(tmp_path / "one.jsonl", [{"text": "Hello there!"}])
    info = pack(tokenizer_dir, tmp_path / "out", src, seq_len=64)
    assert info["blocks"] == 0 and info["dropped_tail_tokens"] == info["tokens"] > 0
    assert list((tmp_path / "out").glob("*.tar")) == []
    assert "no block was written" in capsys.readouterr().err


def test_bad_inputs_are_skipped_counted_and_located(tmp_path, tokenizer_dir, processor):
    src = write_jsonl(tmp_path / "dirty.jsonl", [
        {"text": "Hello there!"}, "{not json", {"text": ""}, {"id": "no text"}, {"messages": "hi"},
        {"messages": [{"content": "no role"}]}, [1, 2], {"text": "Where is it?"}])
    shard = tmp_path / "dirty.tar"
    with wds.TarWriter(str(shard)) as writer:
        writer.write({"__key__": "good", "json": json.dumps({"messages": CONVERSATION}).encode()})
        writer.write({"__key__": "broken", "json": b"{oops"})
        writer.write({"__key__": "imageonly", "png": b"\x89PNG"})
    info = pack(tokenizer_dir, tmp_path / "out", src, shard, seq_len=4)
    assert info["skipped"] == {"bad_json": 2, "no_text": 4, "bad_messages": 2} and info["skipped_total"] == 8
    assert info["documents"] == 3
    listed = [json.loads(line) for line in (tmp_path / "out" / "pack_skipped.jsonl").read_text().splitlines()]
    assert [(r["where"], r["reason"]) for r in listed] == [
        (f"{src}:2", "bad_json"), (f"{src}:3", "no_text"), (f"{src}:4", "no_text"), (f"{src}:5", "bad_messages"),
        (f"{src}:6", "bad_messages"), (f"{src}:7", "no_text"), (f"{shard}:broken", "bad_json"),
        (f"{shard}:imageonly", "no_text")]
    stream = expected_stream(processor, ["Hello there!", "Where is it?", CONVERSATION])
    joined = join_blocks(torch.cat([b for _, _, b in read_pack(tmp_path / "out")]))
    assert joined.tolist() == stream[: info["blocks"] * 4 + 1]


def test_truncated_shard_is_reported_not_fatal(tmp_path, tokenizer_dir):
    with ShardSink(tmp_path / "src", "t", 100) as sink:
        for i in range(20):
            sink.write(f"k{i}", {"json": {"text": f"Hello there! {'I see a red circle. ' * 20}"}})
    whole = (tmp_path / "src" / "t-000000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2 + 100])
    info = pack(tokenizer_dir, tmp_path / "out", cut, seq_len=4)
    assert info["skipped"] == {"unreadable_shard": 1}
    assert 0 < info["documents"] < 20
    listed = json.loads((tmp_path / "out" / "pack_skipped.jsonl").read_text())
    assert listed["where"] == str(cut) and "lost" in listed["detail"]


def test_chat_template_failure_is_a_skip():
    class Failing:
        tokenizer = None

        def apply_chat_template(self, messages, tokenize):
            raise TypeError("cannot render")

    encoder = Encoder(Failing(), eos_token_id=0)
    out = encoder([Document("f.jsonl:3", "messages", CONVERSATION), Skip("f.jsonl:4", "bad_json", "x")])
    assert out[0] == Skip("f.jsonl:3", BAD_MESSAGES, "chat template failed (TypeError: cannot render)")
    assert out[1] == Skip("f.jsonl:4", "bad_json", "x")


def _snapshot(out):
    return ([(k, s, b.tolist()) for k, s, b in read_pack(out)], (out / "sizes.json").read_text(),
            (out / "pack_info.json").read_text())


def test_output_is_deterministic_with_and_without_workers(tmp_path, tokenizer_dir, corpus):
    inputs, _ = corpus
    pack(tokenizer_dir, tmp_path / "a", *inputs)
    pack(tokenizer_dir, tmp_path / "b", *inputs)
    pack(tokenizer_dir, tmp_path / "c", *inputs, extra=["--num_workers", "2", "--batch_size", "2"])
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b") == _snapshot(tmp_path / "c")


def test_txt_documents_per_line_or_paragraph(tmp_path, tokenizer_dir, processor):
    src = tmp_path / "t.txt"
    src.write_text("Hello there!\nWhere is it?\n\nWhat do you see?\n")
    for mode, documents in (("paragraph", ["Hello there!\nWhere is it?", "What do you see?"]),
                            ("line", ["Hello there!", "Where is it?", "What do you see?"])):
        info = pack(tokenizer_dir, tmp_path / mode, src, seq_len=2, extra=["--txt_documents", mode])
        stream = expected_stream(processor, documents)
        joined = join_blocks(torch.cat([b for _, _, b in read_pack(tmp_path / mode)]))
        assert info["documents"] == len(documents) and joined.tolist() == stream[: info["blocks"] * 2 + 1]


def test_eos_token_option_changes_the_separator(tmp_path, tokenizer_dir, processor):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "Hello there!"}, {"text": "Where is it?"}])
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert pad != processor.tokenizer.eos_token_id
    info = pack(tokenizer_dir, tmp_path / "out", src, seq_len=2, extra=["--eos_token", "<|endoftext|>"])
    assert (info["eos_token"], info["eos_token_id"]) == ("<|endoftext|>", pad)
    stream = expected_stream(processor, ["Hello there!", "Where is it?"], eos_id=pad)
    assert info["blocks"] == (len(stream) - 1) // 2
    joined = join_blocks(torch.cat([b for _, _, b in read_pack(tmp_path / "out")]))
    assert joined.tolist() == stream[: info["blocks"] * 2 + 1]
    with pytest.raises(ValueError, match="<nope>"):
        pack(tokenizer_dir, tmp_path / "out2", src, extra=["--eos_token", "<nope>"])


@pytest.fixture(scope="module")
def big_vocab_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(70000)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("big_vocab")
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)
    return path


def test_large_vocabulary_is_stored_as_uint32(tmp_path, big_vocab_dir):
    src = tmp_path / "w.txt"
    src.write_text("w69999 w3 w65534 w65535\n\nw0 w1\n")
    info = pack(big_vocab_dir, tmp_path / "out", src, seq_len=3, per_sample=1)
    assert (info["dtype"], info["vocab_size"]) == ("uint32", 70002)
    raw = next(iter(wds.DataPipeline(wds.SimpleShardList([str(tmp_path / "out" / "text-000000.tar")]),
                                     wds.tarfile_to_samples())))
    assert np.load(io.BytesIO(raw["tokens.npy"])).dtype == np.uint32
    joined = join_blocks(torch.cat([b for _, _, b in read_pack(tmp_path / "out")]))
    assert info["blocks"] == 2  # 8 tokens: w69999 w3 w65534 w65535 <eos> w0 w1 <eos>
    assert joined.tolist() == [70001, 5, 65536, 65537, 1, 2, 3, 1][:7]


def test_missing_input_is_named(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        pack(tokenizer_dir, tmp_path / "out", tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"nothing\*\.jsonl"):
        pack(tokenizer_dir, tmp_path / "out", tmp_path / "nothing*.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="data.csv"):
        pack(tokenizer_dir, tmp_path / "out", tmp_path / "data.csv")


def test_globs_and_directories_expand_in_sorted_order(tmp_path, tokenizer_dir, processor):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "b.jsonl", [{"text": "Where is it?"}])
    write_jsonl(data / "a.jsonl", [{"text": "Hello there!"}])
    (data / "sizes.json").write_text("{}")
    by_glob = pack(tokenizer_dir, tmp_path / "g", str(data / "*.jsonl"), seq_len=2)
    by_dir = pack(tokenizer_dir, tmp_path / "d", data, seq_len=2)
    assert by_glob["inputs"] == by_dir["inputs"] == [str(data / "a.jsonl"), str(data / "b.jsonl")]
    stream = expected_stream(processor, ["Hello there!", "Where is it?"])
    joined = join_blocks(torch.cat([b for _, _, b in read_pack(tmp_path / "g")]))
    assert by_glob["blocks"] == (len(stream) - 1) // 2 and joined.tolist() == stream[: by_glob["blocks"] * 2 + 1]


def test_existing_pack_is_refused_then_overwritten(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "I see a red circle at the top left."}] * 6)
    out = tmp_path / "out"
    first = pack(tokenizer_dir, out, src, seq_len=2, per_sample=1, per_shard=1)
    assert len(first["shards"]) > 3
    with pytest.raises(FileExistsError, match="--overwrite"):
        pack(tokenizer_dir, out, src, seq_len=2)
    second = pack(tokenizer_dir, out, src, seq_len=2, per_sample=100, per_shard=10, extra=["--overwrite", "true"])
    assert sorted(p.name for p in out.glob("*.tar")) == list(second["shards"]) == ["text-000000.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"text-000000.tar": second["samples"]}


def test_directory_with_foreign_shards_is_refused(tmp_path, tokenizer_dir):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "Hello there!"}])
    out = tmp_path / "out"
    out.mkdir()
    with tarfile.open(out / "other-000000.tar", "w"):
        pass
    with pytest.raises(FileExistsError, match="did not write"):
        pack(tokenizer_dir, out, src, extra=["--overwrite", "true"])
    assert (out / "other-000000.tar").exists()


def test_special_token_strings_in_plain_text_are_literal_by_default(tmp_path, tokenizer_dir, processor):
    text = "Hello <|im_end|> there!"
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": text}])
    tok = processor.tokenizer
    eos = tok.eos_token_id
    literal = pack(tokenizer_dir, tmp_path / "lit", src, seq_len=2, per_sample=100)
    joined = join_blocks(torch.cat([b for _, _, b in read_pack(tmp_path / "lit")])).tolist()
    stream = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [eos]
    assert joined == stream[: literal["blocks"] * 2 + 1] and eos not in stream[:-1]
    parsed = pack(tokenizer_dir, tmp_path / "parsed", src, seq_len=2, per_sample=100,
                  extra=["--special_tokens_in_text", "true"])
    joined = join_blocks(torch.cat([b for _, _, b in read_pack(tmp_path / "parsed")])).tolist()
    assert eos in joined[:-1] and parsed["tokens"] < literal["tokens"]


def test_interrupted_pack_is_marked_incomplete_and_can_be_redone(tmp_path, tokenizer_dir, monkeypatch):
    from latent_mca.importers import pack as pack_module

    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "I see a red circle at the top left."}] * 4)
    real = pack_module.iter_documents

    def failing(files, txt_documents):
        yield from real(files, txt_documents)
        raise OSError("disk went away")

    monkeypatch.setattr(pack_module, "iter_documents", failing)
    with pytest.raises(OSError, match="disk went away"):
        pack(tokenizer_dir, tmp_path / "out", src, seq_len=2, per_sample=2, extra=["--batch_size", "1"])
    with pytest.raises(BlockFormatError, match="interrupted"):
        read_pack_info(tmp_path / "out")
    assert len(list((tmp_path / "out").glob("text-*.tar"))) >= 1
    (tmp_path / "out" / "sizes.json").unlink()  # as after a kill: the shards are known by their prefix only
    monkeypatch.setattr(pack_module, "iter_documents", real)
    with pytest.raises(FileExistsError, match="--overwrite"):
        pack(tokenizer_dir, tmp_path / "out", src, seq_len=2, per_sample=2)
    info = pack(tokenizer_dir, tmp_path / "out", src, seq_len=2, per_sample=2, extra=["--overwrite", "true"])
    assert read_pack_info(tmp_path / "out")["complete"] is True and info["documents"] == 4
