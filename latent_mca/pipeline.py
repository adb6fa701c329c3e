"""``python -m latent_mca pipeline``: the whole method, end to end, under one run directory.

Steps: the synthetic world and the tiny backbone (generated when missing), then every phase of the config in
order (by default SFT -> projector -> inverse dynamics -> behaviour cloning -> latent RL, and the token-RL
baseline), each one a ``fit`` of its phase YAML, then ``evaluate`` of every listed agent on the test splits,
then a summary table. Phase YAMLs locate their inputs and outputs under ``${oc.env:LATENT_MCA_RUN_DIR}``,
which the pipeline sets to ``run_dir``, and name their own outputs ``${oc.env:LATENT_MCA_PHASE}``, which the
pipeline sets to the phase's name (so one YAML serves several named phases, e.g. GRPO and Dr.GRPO).

Re-running skips phases whose export is complete (``export_complete.json``) and agents already evaluated;
``force`` names phases to redo. A phase interrupted mid-run resumes from its ``checkpoints/last.ckpt``.

Layout::

    <run_dir>/world/         synthetic world shards        <run_dir>/backbone/    tiny Qwen2.5-VL
    <run_dir>/<phase>/export  phase output                 <run_dir>/<phase>/checkpoints
    <run_dir>/logs/<phase>/   TensorBoard + config.yaml    <run_dir>/eval/<agent>/ records and results
    <run_dir>/summary.md      the final tables
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from latent_mca.checkpoint import completion_info, is_complete
from latent_mca.eval.evaluate import Sampling, evaluate, results_markdown
from latent_mca.eval.records import markdown_table
from latent_mca.models.tiny import TinyBackboneSpec
from latent_mca.rl.rewards.base import PairwiseJudge
from latent_mca.world.spec import WorldSpec

RUN_DIR_ENV = "LATENT_MCA_RUN_DIR"
PHASE_ENV = "LATENT_MCA_PHASE"


@dataclass
class PhaseSpec:
    """One training phase of the pipeline.

    Attributes:
        name: Directory under the run directory (its export is ``<name>/export``; must match the YAML).
        config: The phase YAML (``fit --config``).
        overrides: Extra command-line arguments (e.g. ``--model.init_args.rl.algorithm=dr_grpo``); ``{run_dir}``
            is replaced by the run directory.
    """

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class AgentSpec:
    """An agent to evaluate.

    Attributes:
        name: Row name in the results table.
        kind: ``token`` (a Hugging Face checkpoint) or ``latent`` (a phase export with a policy).
        path: Its directory, relative to the run directory.
        sampling: Evaluation sampling for this agent (None: the pipeline's ``eval_sampling``).
    """

    name: str
    kind: Literal["token", "latent"]
    path: str
    sampling: Sampling | None = None


def _prepare_world(run: Path, seed: int, world: WorldSpec) -> None:
    from latent_mca.world import generate_world

    if (run / "world" / "world.json").exists():
        print(f"[pipeline] world: exists, skipped ({run / 'world'})")
        return
    print("[pipeline] world: generating")
    generate_world(run / "world", world, seed=seed, overwrite=True)


def _prepare_backbone(run: Path, seed: int, world: WorldSpec, backbone: TinyBackboneSpec) -> None:
    from latent_mca.models.tiny import build_tiny_backbone

    if (run / "backbone" / "config.json").exists():
        print(f"[pipeline] backbone: exists, skipped ({run / 'backbone'})")
        return
    print("[pipeline] backbone: building the tiny Qwen2.5-VL")
    corpus = (run / "world" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    spec = dataclasses.replace(backbone, image_size=world.image_size)  # the processor must match the world
    build_tiny_backbone(run / "backbone", [c for c in corpus if c.strip()], spec, seed=seed)


def _run_phase(run: Path, phase: PhaseSpec, seed: int, force: bool) -> dict[str, Any]:
    from latent_mca.cli import lightning_main

    export = run / phase.name / "export"
    if is_complete(export) and not force:
        print(f"[pipeline] {phase.name}: export complete, skipped")
        return {"status": "skipped", **completion_info(export)}
    args = ["fit", "--config", phase.config, f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
            *(o.replace("{run_dir}", str(run)) for o in phase.overrides)]
    last = run / phase.name / "checkpoints" / "last.ckpt"
    if last.exists() and not force:
        args.append(f"--ckpt_path={last}")
        print(f"[pipeline] {phase.name}: resuming from {last}")
    elif force and last.exists():
        last.unlink()
    print(f"[pipeline] {phase.name}: {PHASE_ENV}={phase.name} python -m latent_mca {' '.join(args)}")
    start = time.perf_counter()
    os.environ[PHASE_ENV] = phase.name  # the phase YAML puts its export, checkpoints and logs under this name
    try:
        lightning_main(args)
    finally:
        os.environ.pop(PHASE_ENV, None)
    if not is_complete(export):
        raise RuntimeError(f"phase {phase.name} finished without a complete export in {export}: check that its "
                           f"YAML's export_dir is ${{oc.env:{RUN_DIR_ENV}}}/${{oc.env:{PHASE_ENV}}}/export")
    return {"status": "ran", "seconds": time.perf_counter() - start, **completion_info(export)}


def pipeline(
    run_dir: str = "runs/demo",
    seed: int = 0,
    world: WorldSpec | None = None,
    backbone: TinyBackboneSpec | None = None,
    phases: list[PhaseSpec] | None = None,
    agents: list[AgentSpec] | None = None,
    eval_splits: dict[str, str] | None = None,
    eval_sampling: Sampling | None = None,
    eval_max_prompts: int | None = None,
    judge: PairwiseJudge | None = None,
    force: list[str] | None = None,
    skip_eval: bool = False,
) -> dict[str, Any]:
    """Run the method end to end: world, backbone, every phase, evaluation, summary.

    Args:
        run_dir: Everything goes under this directory (also exported to phase YAMLs as ``LATENT_MCA_RUN_DIR``).
        seed: Seed of the world, the backbone initialisation and every phase.
        world: Synthetic world sizes.
        backbone: Tiny backbone sizes (its image size follows the world's).
        phases: The phases, in order.
        agents: Agents to evaluate after training.
        eval_splits: Split name -> dialogue shards, relative to the run directory.
        eval_sampling: Evaluation sampling (N generations per prompt, length, temperature).
        eval_max_prompts: At most this many prompts per split (None: all).
        judge: Pairwise judge for evaluation (default: the synthetic world's rule judge).
        force: Phase (or agent) names to redo even if their outputs exist; ``all`` redoes everything.
        skip_eval: Stop after training.

    Returns:
        The phase summaries and evaluation results.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(run)
    world, backbone = world or WorldSpec(), backbone or TinyBackboneSpec()
    forced = set(force or [])
    started = time.perf_counter()
    _prepare_world(run, seed, world)
    _prepare_backbone(run, seed, world, backbone)
    summary: dict[str, Any] = {"run_dir": str(run), "seed": seed, "phases": {}, "eval": []}
    for phase in phases or []:
        summary["phases"][phase.name] = _run_phase(run, phase, seed, "all" in forced or phase.name in forced)
    if not skip_eval:
        if judge is None:
            from latent_mca.rl.rewards.world import WorldJudge

            judge = WorldJudge()
        splits = {k: str(run / v) for k, v in (eval_splits or {}).items()}
        for agent in agents or []:
            summary["eval"].append(_evaluate_agent(run, agent, splits, judge, eval_sampling, eval_max_prompts,
                                                   seed, "all" in forced or agent.name in forced))
    summary["seconds"] = time.perf_counter() - started
    text = summary_markdown(summary)
    (run / "summary.md").write_text(text)
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(text)
    return summary


def _evaluate_agent(run: Path, agent: AgentSpec, splits: dict[str, str], judge: PairwiseJudge,
                    sampling: Sampling | None, max_prompts: int | None, seed: int, force: bool) -> dict[str, Any]:
    out = run / "eval" / agent.name
    if (out / "results.json").exists() and not force:
        print(f"[pipeline] evaluate {agent.name}: done before, skipped")
        return json.loads((out / "results.json").read_text())
    print(f"[pipeline] evaluate {agent.name} ({agent.kind}: {agent.path})")
    return evaluate(agent.kind, str(run / agent.path), splits, judge, str(out), sampling=agent.sampling or sampling,
                    max_prompts=max_prompts, seed=seed, name=agent.name)


def summary_markdown(summary: dict[str, Any]) -> str:
    """The phase table and the results table."""
    rows = []
    for name, info in summary["phases"].items():
        metrics = info.get("metrics", {})
        keys = [k for k in ("train/loss", "val/loss", "val/projector_nll", "val/mm_wm_gain", "val/mm_bc_acc",
                            "train/reward") if k in metrics]
        rows.append({"phase": name, "status": info["status"], "seconds": f"{info.get('seconds', 0.0):.0f}",
                     "steps": info.get("global_step", ""),
                     "final metrics": ", ".join(f"{k}={metrics[k]:.3f}" for k in keys)})
    parts = [f"# Pipeline summary ({summary['run_dir']}, seed {summary['seed']})", "",
             markdown_table(rows, ["phase", "status", "seconds", "steps", "final metrics"])]
    if summary["eval"]:
        parts += ["", "## Evaluation (judge score ratio: mean ± std over generations)", "",
                  results_markdown(summary["eval"])]
    if "seconds" in summary:
        parts += ["", f"Total wall time: {summary['seconds']:.0f} s"]
    return "\n".join(parts) + "\n"
