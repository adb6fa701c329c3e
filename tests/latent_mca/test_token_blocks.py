import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from latent_mca.token_blocks import (
    PACK_INFO_NAME,
    TOKENS_FIELD,
    BlockFormatError,
    BlockPacker,
    BlockWriter,
    block_dtype,
    decode_block_sample,
    encode_blocks,
    join_blocks,
    read_pack_info,
    sample_key,
)


def _pack(stream, seq_len, per_sample, pieces, dtype="uint32"):
    """Feed ``stream`` cut at ``pieces`` boundaries; return the packer and every sample it produced."""
    packer = BlockPacker(seq_len, per_sample, dtype)
    samples = []
    for piece in np.split(stream, pieces):
        samples += packer.add(piece)
    last = packer.finish()
    return packer, samples + ([last] if last is not None else [])


@pytest.mark.parametrize("vocab, expected", [(1, "uint16"), (65535, "uint16"), (65536, "uint32"),
                                             (152064, "uint32")])
def test_block_dtype(vocab, expected):
    assert block_dtype(vocab) == np.dtype(expected)


def test_block_dtype_rejects_an_empty_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        block_dtype(0)


@pytest.mark.parametrize("seq_len, per_sample, length", [(4, 3, 50), (1, 2, 9), (7, 1, 64), (5, 4, 21), (3, 2, 13)])
def test_packed_blocks_overlap_by_one_and_cover_the_stream(seq_len, per_sample, length):
    rng = np.random.default_rng(length)
    stream = rng.integers(0, 1000, size=length)
    pieces = np.sort(rng.choice(np.arange(1, length), size=min(6, length - 1), replace=False))
    packer, samples = _pack(stream, seq_len, per_sample, pieces)
    n_blocks = (length - 1) // seq_len
    blocks = np.concatenate(samples)
    assert blocks.shape == (n_blocks, seq_len + 1)
    for b in range(n_blocks):  # the documented layout, block by block
        assert blocks[b].tolist() == stream[b * seq_len: b * seq_len + seq_len + 1].tolist()
    assert join_blocks(blocks).tolist() == stream[: n_blocks * seq_len + 1].tolist()
    assert all(s.shape[0] == per_sample for s in samples[:-1]) and 1 <= samples[-1].shape[0] <= per_sample
    assert packer.blocks == n_blocks and packer.tokens == length
    assert packer.dropped_tail_tokens == length - (n_blocks * seq_len + 1)


def test_stream_of_exactly_whole_samples_drops_nothing():
    packer, samples = _pack(np.arange(2 * 3 * 4 + 1), 4, 3, [5, 11])
    assert [s.shape for s in samples] == [(3, 5), (3, 5)]
    assert packer.dropped_tail_tokens == 0


def test_stream_shorter_than_one_block_is_all_dropped():
    packer, samples = _pack(np.arange(5), 5, 2, [2])
    assert samples == [] and packer.blocks == 0 and packer.dropped_tail_tokens == 5


def test_packer_checks_ids_against_the_dtype():
    packer = BlockPacker(4, 2, "uint16")
    packer.add([0, 65535])
    with pytest.raises(ValueError, match="65535"):
        packer.add([65536])
    with pytest.raises(ValueError, match="-1"):
        packer.add([3, -1])
    packer.finish()
    with pytest.raises(ValueError, match="after finish"):
        packer.add([1])


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_encode_decode_round_trip(dtype):
    high = 65535 if dtype == "uint16" else 2**32 - 1
    blocks = np.array([[0, 1, high], [high, 7, 3]], dtype=dtype)
    out = decode_block_sample({"__key__": sample_key(3), TOKENS_FIELD: encode_blocks(blocks)}, seq_len=2)
    assert out.dtype == torch.long and out.shape == (2, 3)
    assert out.tolist() == [[0, 1, high], [high, 7, 3]]


def test_sample_keys_are_zero_padded_and_sort_numerically():
    keys = [sample_key(i) for i in (0, 9, 10, 123456)]
    assert keys[0] == "000000000000" and sorted(keys) == keys and "." not in "".join(keys)


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("field, message", [
    (None, "no 'tokens.npy'"),
    (b"not an npy file", "not a valid .npy"),
    (_npy(np.zeros((2, 5), dtype=np.float32)), "dtype float32"),
    (_npy(np.zeros(5, dtype=np.uint16)), r"shape \(5,\)"),
    (_npy(np.zeros((0, 5), dtype=np.uint16)), r"shape \(0, 5\)"),
    (_npy(np.zeros((2, 9), dtype=np.uint16)), "hold 9 tokens, expected seq_len"),
])
def test_corrupt_samples_are_refused_naming_the_key(field, message):
    sample = {"__key__": "000000000042", "__url__": "shards/text-000003.tar"}
    if field is not None:
        sample[TOKENS_FIELD] = field
    with pytest.raises(BlockFormatError, match=message) as info:
        decode_block_sample(sample, seq_len=4)
    assert "000000000042" in str(info.value) and "text-000003.tar" in str(info.value)


def test_truncated_npy_is_refused():
    data = encode_blocks(np.arange(40, dtype=np.uint16).reshape(4, 10))
    with pytest.raises(BlockFormatError, match="'k7'"):
        decode_block_sample({"__key__": "k7", TOKENS_FIELD: data[:-7]})


def test_join_blocks_by_hand():
    assert join_blocks(torch.tensor([[0, 1, 2], [2, 3, 4], [4, 5, 6]])).tolist() == [0, 1, 2, 3, 4, 5, 6]


def _read_shards(out_dir):
    urls = sorted(str(p) for p in out_dir.glob("*.tar"))
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def test_block_writer_writes_readable_shards_and_counts(tmp_path):
    stream = np.arange(3 * 2 * 4 + 3)  # 3 samples of 2 blocks of seq_len 4, then a 2-token tail beyond the overlap
    with BlockWriter(tmp_path, seq_len=4, blocks_per_sample=2, dtype="uint16", prefix="tx",
                     samples_per_shard=2) as writer:
        writer.add(stream[:10])
        writer.add(stream[10:])
    samples = _read_shards(tmp_path)
    assert [s["__key__"] for s in samples] == [sample_key(i) for i in range(3)]
    blocks = torch.cat([decode_block_sample(s, seq_len=4) for s in samples])
    assert join_blocks(blocks).tolist() == list(range(25))
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"tx-000000.tar": 2, "tx-000001.tar": 1}
    summary = writer.summary()
    assert summary["shards"] == {"tx-000000.tar": {"samples": 2, "blocks": 4},
                                 "tx-000001.tar": {"samples": 1, "blocks": 2}}
    assert (summary["blocks"], summary["tokens"], summary["dropped_tail_tokens"]) == (6, 27, 2)


def test_block_writer_on_error_keeps_whole_samples_only(tmp_path):
    with pytest.raises(RuntimeError):
        with BlockWriter(tmp_path, seq_len=2, blocks_per_sample=2, dtype="uint16") as writer:
            writer.add(np.arange(7))  # one whole sample written, the rest buffered
            raise RuntimeError("interrupted")
    assert [s["__key__"] for s in _read_shards(tmp_path)] == [sample_key(0)]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"text-000000.tar": 1}


def test_read_pack_info_checks_the_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="pack-text"):
        read_pack_info(tmp_path)
    (tmp_path / PACK_INFO_NAME).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(BlockFormatError, match="does not describe"):
        read_pack_info(tmp_path)
    (tmp_path / PACK_INFO_NAME).write_text(json.dumps({"format": "latent_mca.token_blocks", "version": 2}))
    with pytest.raises(BlockFormatError, match="version 2"):
        read_pack_info(tmp_path)
    (tmp_path / PACK_INFO_NAME).write_text(json.dumps({"format": "latent_mca.token_blocks", "version": 1,
                                                       "complete": True}))
    with pytest.raises(BlockFormatError, match="seq_len"):
        read_pack_info(tmp_path)
    info = {"format": "latent_mca.token_blocks", "version": 1, "seq_len": 4, "dtype": "uint16",
            "blocks_per_sample": 2, "eos_token_id": 1, "vocab_size": 9, "samples": 1, "blocks": 2, "complete": False}
    (tmp_path / PACK_INFO_NAME).write_text(json.dumps(info))
    with pytest.raises(BlockFormatError, match="interrupted"):
        read_pack_info(tmp_path)
    (tmp_path / PACK_INFO_NAME).write_text(json.dumps({**info, "complete": True}))
    assert read_pack_info(tmp_path) == {**info, "complete": True}
