"""``python -m latent_mca evaluate``: sample N replies per test prompt from any stage's agent and score them.

Agents:
    * ``token``: a Hugging Face checkpoint (the SFT model, a token-RL model, any VLM) generating tokens;
    * ``latent``: a phase export holding a policy, codebook and world model (BC or latent RL), on the backbone
      its ``phase.json`` references (or ``--backbone`` when given).

For every split (e.g. ``test_id`` and ``test_ood``) it writes one JSONL record per (split, prompt, generation),
computes the judge score ratio with the paper's protocol (mean over aspects of s_A / s_B per sample, mean over
samples per generation, mean and std over the N generations) and rollout diversity (semantic diversity and
distinct-n over the N replies of each prompt), and writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from latent_mca.eval.diversity import diversity_report
from latent_mca.eval.metrics import judge_score_ratio
from latent_mca.eval.records import EvalRecord, fmt_mean_std, markdown_table, write_records
from latent_mca.rl.rewards.base import PairwiseJudge, RewardInput

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """How replies are sampled at evaluation.

    Attributes:
        num_generations: Replies per prompt (the paper: 3).
        max_new_tokens: Reply length limit.
        temperature: Sampling temperature of the actions (codes for latent agents, tokens otherwise).
        top_k: Top-k truncation (0: none).
        top_p: Nucleus truncation (1.0: none).
    """

    num_generations: int = 3
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


class Generator:
    """Generates ``num_generations`` replies for a batch of dialogue prompts."""

    def __init__(self, agent: Literal["token", "latent"], path: str, backbone: str | None, device: str) -> None:
        from latent_mca.models import Backbone, Codebook, CodebookConfig, LatentPolicy, LatentPolicyConfig
        from latent_mca.models import WorldModel, WorldModelConfig

        self.kind = agent
        self.device = torch.device(device)
        if agent == "token":
            self.backbone = Backbone.from_pretrained(path)
            self.agent = None
        else:
            from latent_mca.checkpoint import load_phase
            from latent_mca.models.agent import LatentAgent

            export = load_phase(path)
            self.backbone = Backbone.from_pretrained(backbone or export.backbone.path)
            export.check_backbone(self.backbone)
            self.agent = LatentAgent(self.backbone, export.build("policy", LatentPolicyConfig, LatentPolicy),
                                     export.build("codebook", CodebookConfig, Codebook),
                                     export.build("world_model", WorldModelConfig, WorldModel)).eval()
        self.backbone.to(self.device)
        if self.agent is not None:
            self.agent.to(self.device)
        self.processor_path = backbone or (path if agent == "token" else self.backbone.config.path)

    @torch.no_grad()
    def __call__(self, prompt: Any, sampling: Sampling, generator: torch.Generator) -> list[str]:
        """``num_generations`` replies per prompt, grouped by prompt."""
        from latent_mca.models.agent import SamplingConfig
        from latent_mca.rl.advantages import completion_mask_from_eos
        from latent_mca.rl.update import decode_completions

        prompt = _to(prompt, self.device)
        n = sampling.num_generations
        if self.agent is not None:
            cfg = SamplingConfig(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                 top_k=sampling.top_k, top_p=sampling.top_p)
            roll = self.agent.generate(prompt, cfg, num_samples=n, generator=generator)
            tokens, mask = roll.tokens, roll.mask
        else:
            tokens = self.backbone.generate(prompt.input_ids, prompt.attention_mask, prompt.vision,
                                            max_new_tokens=sampling.max_new_tokens, do_sample=True,
                                            temperature=sampling.temperature, top_k=sampling.top_k,
                                            top_p=sampling.top_p, num_return_sequences=n)
            eos = torch.tensor(self.backbone.eos_token_ids, device=tokens.device)
            mask = completion_mask_from_eos(torch.isin(tokens, eos))
        return decode_completions(self.backbone.tokenizer, tokens, mask)


def _to(inputs: Any, device: torch.device) -> Any:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(inputs, device)


def _split_name(spec: str) -> str:
    """A short split name from a shard spec (``.../dialogue/test_ood-*.tar`` -> ``test_ood``)."""
    stem = Path(spec.split("{")[0].split("*")[0]).name.rstrip("-_")
    return stem or Path(spec).parent.name


def evaluate(
    agent: Literal["token", "latent"],
    path: str,
    splits: dict[str, str],
    judge: PairwiseJudge,
    out: str,
    backbone: str | None = None,
    sampling: Sampling | None = None,
    batch_size: int = 8,
    max_prompts: int | None = None,
    diversity_encoder: Literal["ngram", "backbone"] = "ngram",
    seed: int = 0,
    device: str = "cpu",
    name: str | None = None,
) -> dict[str, Any]:
    """Sample replies on test splits, judge them against the references and measure diversity.

    Args:
        agent: ``token`` (a Hugging Face checkpoint) or ``latent`` (a phase export with a policy).
        path: The checkpoint directory (token) or the phase export directory (latent).
        splits: Split name -> dialogue shards (e.g. ``{test_id: runs/demo/world/dialogue/test_id-*.tar}``).
        judge: A pairwise judge (``class_path`` in YAML): the synthetic world's rule judge or an LLM judge.
        out: Output directory (records, results.json, results.md).
        backbone: Backbone path for a latent agent (default: the one its export references).
        sampling: Sampling settings (N generations per prompt, length, temperature, top-k, top-p).
        batch_size: Prompts per generation batch.
        max_prompts: Evaluate at most this many prompts per split (None: all).
        diversity_encoder: ``ngram`` (TF-IDF, no model) or ``backbone`` (mean-pooled states of the agent's
            backbone) for semantic diversity.
        seed: Sampling seed.
        device: ``cpu`` or ``cuda``.
        name: Agent name in the tables (default: the directory name).

    Returns:
        The results per split.
    """
    from data_modules.dialogue import DialogueDataModule

    sampling = sampling or Sampling()
    gen = Generator(agent, path, backbone, device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or (Path(path).parent.name if Path(path).name == "export" else Path(path).name)
    rng = torch.Generator(device=gen.device).manual_seed(seed)
    results: dict[str, Any] = {"agent": name, "kind": agent, "path": path, "sampling": asdict(sampling)}
    for split, shards in splits.items():
        dm = DialogueDataModule(gen.processor_path, test=shards, batch_size=batch_size, with_reference=False,
                                num_workers=0)
        dm.setup("test")
        records = _generate_split(gen, dm, split, sampling, rng, max_prompts)
        _judge(records, judge)
        write_records(out_dir / f"records_{split}.jsonl", records)
        results[split] = _summarise(records, diversity_encoder, gen)
        results[split]["skipped_samples"] = dict(dm.skip_counts)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(results_markdown([results]))
    print(results_markdown([results]))
    return results


def _generate_split(gen: Generator, dm: Any, split: str, sampling: Sampling, rng: torch.Generator,
                    max_prompts: int | None) -> list[EvalRecord]:
    records: list[EvalRecord] = []
    seen: set[str] = set()
    for batch in dm.make_loader("test", 0, 1):
        keep = [i for i, k in enumerate(batch.keys) if k not in seen]  # eval padding repeats samples
        if not keep:
            continue
        texts = gen(batch.prompt, sampling, rng)
        n = sampling.num_generations
        for i in keep:
            key = batch.keys[i]
            seen.add(key)
            for g in range(n):
                records.append(EvalRecord(split=split, key=key, generation=g, reply=texts[i * n + g],
                                          reference=batch.references[i], scores=None, score_error="pending",
                                          metadata={"messages": batch.messages[i], **batch.metadata[i],
                                                    "_image": batch.images[i]}))
        if max_prompts is not None and len(seen) >= max_prompts:
            break
    return records


def _judge(records: list[EvalRecord], judge: PairwiseJudge) -> None:
    inputs = [RewardInput(prompt=r.metadata["messages"], completion=r.reply, reference=r.reference,
                          image=r.metadata.get("_image"), metadata=r.metadata, key=r.id) for r in records]
    scores = judge.score(inputs)
    for record, score in zip(records, scores):
        record.metadata.pop("_image", None)
        record.scores = score
        record.score_error = None if score is not None else "judge could not score"


def _summarise(records: list[EvalRecord], encoder_name: str, gen: Generator) -> dict[str, Any]:
    from latent_mca.eval.diversity import HFMeanPoolEncoder

    ratio = judge_score_ratio({(r.key, r.generation): r.scores for r in records})
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(r.key, []).append(r.reply)
    encoder = HFMeanPoolEncoder(gen.backbone) if encoder_name == "backbone" else None
    return {"ratio": ratio.to_dict(), "diversity": diversity_report(groups, encoder),
            "num_prompts": len(groups)}


def results_markdown(all_results: list[dict[str, Any]]) -> str:
    """One table row per agent: judge score ratio (mean ± std over generations) and diversity per split."""
    splits = sorted({k for r in all_results for k in r if isinstance(r.get(k), dict) and "ratio" in r[k]})
    rows = []
    for res in all_results:
        row: dict[str, Any] = {"agent": res["agent"]}
        for split in splits:
            if split in res:
                ratio, div = res[split]["ratio"], res[split]["diversity"]
                row[f"{split} ratio"] = fmt_mean_std(ratio["mean"], ratio["std"])
                row[f"{split} diversity"] = f"{div['semantic_diversity']:.3f}"
                row[f"{split} distinct-2"] = f"{div['distinct_2']:.3f}"
        rows.append(row)
    columns = ["agent"] + [f"{s} {m}" for s in splits for m in ("ratio", "diversity", "distinct-2")]
    return markdown_table(rows, columns)
