"""`evaluate` on fixed generations: the ratio protocol and diversity are computed correctly end to end."""

import json
import statistics

import pytest

from latent_mca.cli import main
from latent_mca.eval import evaluate as evaluate_module
from latent_mca.world.judge import judge_pair
from tests.helpers.demo_run import WORLD, build_demo_run

WRONG = {"red": "blue", "blue": "red"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from dataclasses import replace

    world = replace(WORLD, num_paired=16, num_text_only=16, num_dialogue_train=8, samples_per_shard=8)
    return build_demo_run(tmp_path_factory.mktemp("eval_run"), world=world)


def test_evaluate_on_fixed_generations(run_dir, monkeypatch, tmp_path):
    seen = {}

    def fixed(self, prompt, sampling, generator):
        # Generation 0 repeats the reference; generation 1 is a sentence sharing no word with it.
        replies = []
        for ref in self._batch_references:
            replies += [ref, "zzz qqq"]
        return replies

    real_generate = evaluate_module._generate_split

    def capture(gen, dm, split, sampling, rng, max_prompts):
        original = type(gen).__call__

        def call(self, prompt, sampling, generator):
            return fixed(self, prompt, sampling, generator)

        def loader_with_refs(*args, **kwargs):
            for batch in original_loader(*args, **kwargs):
                gen._batch_references = batch.references
                seen.setdefault(split, []).extend(zip(batch.keys, batch.references, batch.metadata))
                yield batch

        original_loader = dm.make_loader
        dm.make_loader = loader_with_refs
        monkeypatch.setattr(type(gen), "__call__", call)
        try:
            return real_generate(gen, dm, split, sampling, rng, max_prompts)
        finally:
            monkeypatch.setattr(type(gen), "__call__", original)

    monkeypatch.setattr(evaluate_module, "_generate_split", capture)
    out = tmp_path / "eval"
    splits = {"test_id": str(run_dir / "world/dialogue/test_id-*.tar"),
              "test_ood": str(run_dir / "world/dialogue/test_ood-*.tar")}
    result = main(["evaluate", "--agent", "token", "--path", str(run_dir / "backbone"), "--splits", json.dumps(splits),
                   "--judge", "latent_mca.rl.rewards.WorldJudge", "--out", str(out),
                   "--sampling.num_generations", "2", "--batch_size", "3"])
    for split in splits:
        samples = {k: (ref, meta) for k, ref, meta in seen[split]}  # repeats padded by the loader collapse here
        assert result[split]["num_prompts"] == len(samples) == WORLD.num_test_id
        per_gen = []
        for reply_of in (lambda ref: ref, lambda ref: "zzz qqq"):
            ratios = []
            for ref, meta in samples.values():
                a, b = judge_pair(reply_of(ref), ref, meta["facts"])
                ratios.append(statistics.fmean(a[k] / (b[k] + 1e-6) for k in a))
            per_gen.append(statistics.fmean(ratios))
        ratio = result[split]["ratio"]
        assert ratio["mean"] == pytest.approx(statistics.fmean(per_gen))
        assert ratio["std"] == pytest.approx(statistics.stdev(per_gen))
        assert per_gen[0] == pytest.approx(1.0, abs=1e-5) and per_gen[1] < 0.5
        # Each prompt's two replies share no word: TF-IDF vectors are orthogonal, diversity is exactly 2.
        assert result[split]["diversity"]["semantic_diversity"] == pytest.approx(2.0)
        lines = (out / f"records_{split}.jsonl").read_text().splitlines()
        ids = [json.loads(line)["id"] for line in lines]
        assert len(ids) == len(set(ids)) == 2 * len(samples)
    assert "test_ood ratio" in (out / "results.md").read_text()
