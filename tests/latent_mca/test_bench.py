"""The benchmarks run end to end at tiny sizes and write well-formed results; speed is never asserted."""

import json
import statistics

import pytest
import torch

from latent_mca.bench import BENCHMARKS, bench
from latent_mca.bench.common import Target, peak_rss, resolve_sizes, time_pair
from latent_mca.cli import main


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    """Output root of this module's runs; the tiny backbone under ``<root>/backbones`` is built once and reused."""
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def run_records(bench_root):
    """Run one benchmark through the command line at tiny sizes; returns the returned records and the out dir."""

    def run(name, *extra):
        out = bench_root / name
        args = ["bench", "--name", name, "--size", "tiny", "--repeats", "2", "--warmup", "0", "--out", str(out),
                "--cache", str(bench_root / "backbones"), "--threads", "1", *extra]
        return main(args), out

    return run


@pytest.fixture(scope="module")
def run_bench(run_records):
    """Run one benchmark that writes one record: the returned record and the record read back from JSON."""

    def run(name, *extra):
        results, out = run_records(name, *extra)
        return results[name], json.loads((out / f"{name}.json").read_text())

    return run


def check_record(record, name, throughput, with_target):
    assert record["benchmark"] == name and record["size"] == "tiny"
    assert record["repeats"] == 2 and record["warmup"] == 0
    for side in ("ours", "baseline"):
        times = record[side]["times_s"]
        assert len(times) == 2 and all(t > 0 for t in times)
        assert record[side]["median_s"] == pytest.approx(statistics.median(times))
        assert record[side]["tokens_per_s"] == pytest.approx(record["tokens_per_call"] / record[side]["median_s"])
    time_ratio = record["ours"]["median_s"] / record["baseline"]["median_s"]
    assert record["time_ratio"] == pytest.approx(time_ratio)
    assert record["ratio"] == pytest.approx(1 / time_ratio if throughput else time_ratio)
    if with_target:
        target = record["target"]
        met = record["ratio"] <= target["value"] if target["op"] == "<=" else record["ratio"] >= target["value"]
        assert record["passed"] is met
    else:
        assert record["target"] is None and record["passed"] is None
    env = record["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == 1 and env["transformers"]
    assert record["sizes"]["backbone"]["hidden_size"] == 32


def test_decode_forces_full_length_and_reports_throughput(run_bench, capsys):
    returned, record = run_bench("decode")
    assert returned["ratio"] == record["ratio"]
    check_record(record, "decode", throughput=True, with_target=True)
    assert record["tokens_per_call"] == 2 * 4  # batch 2 x 4 new tokens: neither decoder stopped early
    assert record["target"]["op"] == ">=" and record["target"]["paper"] == pytest.approx(0.885, abs=1e-3)
    memory = record["memory"]
    assert "VmHWM" in memory["method"]
    for key in ("ours_bytes", "baseline_bytes"):
        assert memory[key] is None or memory[key] >= 0
    table = capsys.readouterr().out
    assert "### decode (tiny)" in table and "ratio ours/baseline (tokens/s)" in table


def test_rollout_times_g_samples_per_prompt(run_bench):
    _, record = run_bench("rollout", "--memory", "false")
    check_record(record, "rollout", throughput=False, with_target=False)
    assert record["tokens_per_call"] == 2 * 2 * 4  # batch x G x new tokens
    assert record["memory"] is None


def test_rl_step_compares_updates_and_can_profile(run_bench):
    _, record = run_bench("rl-step", "--memory", "false", "--profile", "true", "--token_trainable", "top_n")
    check_record(record, "rl-step", throughput=False, with_target=True)
    sizes = record["sizes"]
    assert sizes["rows"] == 4 and sizes["token_trainable"] == "top_n"
    assert 0 < sizes["trainable_params_ours"] and 0 < sizes["trainable_params_baseline"]
    for side in ("ours", "baseline"):
        ops = record["profile"][side]
        assert ops and all(op["self_ms"] >= 0 and op["calls"] >= 1 for op in ops)
        assert ops == sorted(ops, key=lambda op: -op["self_ms"])


def test_stage1_reports_overhead_without_target(run_bench):
    _, record = run_bench("stage1", "--memory", "false")
    check_record(record, "stage1", throughput=False, with_target=False)
    lengths = record["sizes"]["view_lengths"]
    assert len(lengths) == 3 and lengths[0] > lengths[1]  # the image-text view holds the image tokens


def test_unknown_benchmark_is_named(tmp_path):
    with pytest.raises(ValueError, match="frobnicate"):
        bench("decode,frobnicate", out=str(tmp_path))
    with pytest.raises(ValueError, match="huge"):
        resolve_sizes("huge")
    with pytest.raises(ValueError, match="new_tokens"):
        resolve_sizes("tiny", new_tokens=0)
    assert set(BENCHMARKS) == {"decode", "rollout", "rl-step", "stage1", "loader", "memory"}


def test_time_pair_alternates_order_and_skips_warmup():
    calls = []
    times = time_pair(lambda: calls.append("o"), lambda: calls.append("b"), repeats=3, warmup=2)
    assert calls == ["o", "b"] * 2 + ["o", "b", "b", "o", "o", "b"]
    assert len(times["ours"]) == len(times["baseline"]) == 3


def test_target_direction():
    assert Target("<=", 0.5).met(0.4) and not Target("<=", 0.5).met(0.6)
    assert Target(">=", 0.95).met(1.0) and not Target(">=", 0.95).met(0.9)


def test_peak_rss_sees_a_large_allocation():
    size = 64 * 2**20

    def allocate():
        buf = torch.ones(size // 4)  # float32, every page touched
        return float(buf[-1])

    grown = peak_rss(allocate)
    if grown is not None:  # None only where Linux's /proc counters are unavailable
        assert grown >= 0.9 * size


def test_min_new_tokens_fixes_the_reply_length_of_hf_generate():
    from tests.helpers.vlm_families import qwen2_5_vl

    backbone = qwen2_5_vl()
    eos = backbone.eos_token_ids[0]

    def eos_on_top(module, args, logits):
        logits = logits.clone()
        logits[..., eos] = 1e4
        return logits

    enc = backbone.tokenizer(["hello there", "a longer prompt here"], return_tensors="pt", padding=True,
                             padding_side="left")
    handle = backbone.lm_head.register_forward_hook(eos_on_top)
    try:
        free = backbone.generate(enc.input_ids, enc.attention_mask, max_new_tokens=5, do_sample=False)
        fixed = backbone.generate(enc.input_ids, enc.attention_mask, max_new_tokens=5, do_sample=False,
                                  min_new_tokens=5)
    finally:
        handle.remove()
    assert free.shape[1] == 1 and (free[:, 0] == eos).all()  # the end of turn comes first without a minimum
    assert fixed.shape[1] == 5 and not torch.isin(fixed, torch.tensor(backbone.eos_token_ids)).any()
    with pytest.raises(ValueError, match="min_new_tokens"):
        backbone.generate(enc.input_ids, enc.attention_mask, min_new_tokens=-1)


def test_loader_compares_one_worker_with_the_training_step(run_records, bench_root):
    results, out = run_records("loader", "--memory", "false")
    assert set(results) == {"loader-paired", "loader-mixed"}
    for name, record in results.items():
        assert json.loads((out / f"{name}.json").read_text())["ratio"] == record["ratio"]
        check_record(record, name, throughput=False, with_target=True)
        assert record["target"] == {"op": "<=", "value": 1.0, "paper": None}
        assert record["data_is_bottleneck_with_one_worker"] is (record["ratio"] > 1.0)
        assert record["sizes"]["samples_per_batch"] == record["tokens_per_call"] == 4  # 2 x batch 2, or 2 + 2
    assert (bench_root / "backbones" / "world-tiny" / "world.json").is_file()  # the generated world is cached


@pytest.mark.slow
def test_memory_measures_each_phase_in_its_own_process(run_bench, capsys):
    _, record = run_bench("memory")
    assert "| latent_rl" in capsys.readouterr().out
    assert record["kind"] == "memory" and "VmHWM" in record["method"]
    assert set(record["phases"]) == {"sft", "projector", "inverse_dynamics", "bc", "latent_rl", "token_rl"}
    for phase, r in record["phases"].items():
        assert r["rows"] > 0 and r["trainable_params"] > 0, phase
        assert 0 < r["rss_after_setup_bytes"] <= r["process_peak_bytes"], phase
        assert r["step_peak_bytes"] >= 0, phase
