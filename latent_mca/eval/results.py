"""``python -m latent_mca results``: the paper's table on the embedded world, over several seeds, with plots.

Runs the pipeline config once per seed (each seed in its own run directory, re-runs skip finished work), then
aggregates every agent's judge score ratio and diversity over the seeds (mean ± std across seeds of each
seed's mean over generations), and draws reward curves (``train/reward`` of every RL phase), code usage of the
latent agents and a diversity comparison. Writes ``<out>/results.md``, ``results.json`` and PNG plots.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from latent_mca.eval.records import fmt_mean_std, markdown_table


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def aggregate(per_seed: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows per agent: ratio and diversity per split, mean ± std over seeds."""
    agents: dict[str, dict[str, dict[str, list[float]]]] = {}
    for summary in per_seed.values():
        for res in summary["eval"]:
            slot = agents.setdefault(res["agent"], {})
            for split, block in res.items():
                if isinstance(block, dict) and "ratio" in block:
                    s = slot.setdefault(split, {"ratio": [], "diversity": [], "distinct_2": []})
                    s["ratio"].append(block["ratio"]["mean"])
                    s["diversity"].append(block["diversity"]["semantic_diversity"])
                    s["distinct_2"].append(block["diversity"]["distinct_2"])
    rows = []
    for agent, splits in agents.items():
        row: dict[str, Any] = {"agent": agent, "seeds": max(len(v["ratio"]) for v in splits.values())}
        for split, vals in sorted(splits.items()):
            for metric, values in vals.items():
                row[f"{split}/{metric}"] = _mean_std(values)
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]], metric: str) -> str:
    splits = sorted({k.split("/")[0] for r in rows for k in r if k.endswith(f"/{metric}")})
    out = []
    for r in rows:
        line = {"agent": r["agent"], "seeds": r["seeds"]}
        for s in splits:
            mean, std = r.get(f"{s}/{metric}", (math.nan, math.nan))
            line[s] = fmt_mean_std(mean, std)
        if metric == "ratio" and len(splits) > 1:
            means = [r[f"{s}/{metric}"][0] for s in splits if f"{s}/{metric}" in r]
            line["average"] = f"{statistics.fmean(means):.3f}"
        out.append(line)
    cols = ["agent", "seeds"] + splits + (["average"] if metric == "ratio" and len(splits) > 1 else [])
    return markdown_table(out, cols)


def paired_rows(per_seed: dict[int, dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Per agent and split: its ratio minus the baseline agent's on the same seed, mean ± std over seeds.

    Seeds change the world, the backbone's initialisation and every phase, and move all agents together; the
    paired difference removes that shared part.
    """
    def ratios(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {r["agent"]: {k: v["ratio"]["mean"] for k, v in r.items() if isinstance(v, dict) and "ratio" in v}
                for r in summary["eval"]}

    by_seed = [ratios(s) for s in per_seed.values()]
    agents = list(dict.fromkeys(a for r in by_seed for a in r))
    splits = sorted({k for r in by_seed for a in r.values() for k in a})
    rows = []
    for agent in agents:
        if agent == baseline:
            continue
        row: dict[str, Any] = {"agent": agent}
        for split in splits:
            diffs = [r[agent][split] - r[baseline][split] for r in by_seed
                     if split in r.get(agent, {}) and split in r.get(baseline, {})]
            mean, std = _mean_std(diffs)
            cell = fmt_mean_std(mean, std)
            row[split] = f"+{cell}" if not math.isnan(mean) and mean >= 0 else cell
            row[f"{split} seeds better"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
        rows.append(row)
    return rows


#: Final validation metrics of the stage-1 phases reported per phase (ablations included): the world model's
#: next-token accuracy when driven by the inverse model's codes vs the frozen base model's, and codebook usage.
PHASE_METRICS: dict[str, tuple[str, ...]] = {
    "inverse_dynamics": ("val/mm_base_acc", "val/mm_wm_acc", "val/mm_wm_gain", "val/codes_used",
                         "val/code_perplexity"),
    "bc": ("val/mm_bc_acc", "val/mm_policy_wm_acc", "val/codes_used"),
}


def phase_rows(per_seed: dict[int, dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Per phase whose name starts with ``kind``: each of ``PHASE_METRICS[kind]`` as mean ± std over seeds."""
    names = sorted({p for s in per_seed.values() for p in s["phases"] if p.startswith(kind)})
    rows = []
    for name in names:
        row: dict[str, Any] = {"phase": name}
        for metric in PHASE_METRICS[kind]:
            values = [s["phases"][name]["metrics"].get(metric) for s in per_seed.values() if name in s["phases"]]
            row[metric] = fmt_mean_std(*_mean_std([v for v in values if v is not None]))
        rows.append(row)
    return rows


def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(log_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    points: dict[int, float] = {}
    for version in versions:  # later versions (resumed runs) overwrite earlier steps
        ea = EventAccumulator(str(version), size_guidance={"scalars": 0})
        ea.Reload()
        if tag in ea.Tags().get("scalars", []):
            points.update({e.step: e.value for e in ea.Scalars(tag)})
    return sorted(points.items())


def reward_vs_control(runs: dict[int, Path], phases: list[str]) -> list[dict[str, Any]]:
    """Training reward each RL phase gains over its frozen control (lr = 0, same prompts in the same order).

    For every phase ``<kind>_rl...`` with a ``<kind>_rl_control`` phase in the same run (ablations, which start
    from another export, are left out): per seed, the mean over the second half of the logged steps of
    ``reward(phase) - reward(control)`` at the same step; then mean ± std over seeds. Prompt difficulty, which
    moves both alike, cancels.
    """
    curves: dict[tuple[Path, str], dict[int, float]] = {}

    def rewards(run: Path, phase: str) -> dict[int, float]:  # each event file is read once (controls are shared)
        if (run, phase) not in curves:
            curves[run, phase] = dict(_scalars(run / "logs" / phase, "train/reward"))
        return curves[run, phase]

    rows = []
    for phase in phases:
        kind = phase.split("_rl")[0]
        control = f"{kind}_rl_control"
        if phase == control or "_no_" in phase or control not in phases:
            continue
        gains, own, ctrl = [], [], []
        for run in runs.values():
            mine, base = rewards(run, phase), rewards(run, control)
            steps = sorted(set(mine) & set(base))
            late = [t for t in steps if t >= steps[-1] / 2] if steps else []
            if late:
                gains.append(statistics.fmean(mine[t] - base[t] for t in late))
                own.append(statistics.fmean(mine[t] for t in late))
                ctrl.append(statistics.fmean(base[t] for t in late))
        if gains:
            rows.append({"phase": phase, "control": control, "reward (2nd half)": fmt_mean_std(*_mean_std(own)),
                         "control reward": fmt_mean_std(*_mean_std(ctrl)),
                         "gain over control": fmt_mean_std(*_mean_std(gains)),
                         "seeds with a gain": f"{sum(g > 0 for g in gains)}/{len(gains)}"})
    return rows


def plot_curves(runs: dict[int, Path], phases: list[str], tag: str, path: Path, title: str) -> None:
    """Mean over seeds of a logged scalar, one line per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for phase in phases:
        curves = [dict(_scalars(run / "logs" / phase, tag)) for run in runs.values()]
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(steps, [statistics.fmean(c[s] for c in curves) for s in steps], label=phase)
    ax.set_xlabel("step")
    ax.set_ylabel(tag)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(rows: list[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    """Grouped bars per agent and split (mean over seeds, std as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted({k.split("/")[0] for r in rows for k in r if k.endswith(f"/{metric}")})
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.1), 4))
    width = 0.8 / max(1, len(splits))
    for i, split in enumerate(splits):
        means = [r.get(f"{split}/{metric}", (math.nan, math.nan))[0] for r in rows]
        stds = [r.get(f"{split}/{metric}", (math.nan, math.nan))[1] for r in rows]
        stds = [0 if math.isnan(s) else s for s in stds]
        ax.bar([j + i * width for j in range(len(rows))], means, width, yerr=stds, label=split)
    ax.set_xticks([j + width * (len(splits) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["agent"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results(pipeline_config: str = "configs/demo/results.yaml", seeds: list[int] | None = None,
            root: str = "runs/results", out: str = "docs/results",
            baselines: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline for every seed and write the aggregated table and plots.

    Args:
        pipeline_config: A pipeline config (phases, agents, splits), e.g. with the ablation phases. (Not
            ``config``: the command line reserves ``--config`` for files of this command's own arguments.)
        seeds: Seeds to run (default 0, 1, 2).
        root: Runs go to ``<root>/seed<N>`` (re-runs skip finished phases).
        out: Directory for ``results.md``, ``results.json`` and the plots.
        baselines: Agents every other agent is compared with seed by seed (default ``SFT`` and ``BC (latent)``,
            the starting points of token and latent RL); absent ones are left out.

    Returns:
        The aggregated rows.
    """
    from latent_mca.cli import run_command

    seeds = seeds if seeds is not None else [0, 1, 2]
    runs = {s: Path(root) / f"seed{s}" for s in seeds}
    per_seed = {}
    for seed, run in runs.items():
        args = ["--config", pipeline_config, "--seed", str(seed), "--run_dir", str(run)]
        per_seed[seed] = run_command("pipeline", args)
    rows = aggregate(per_seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rl_phases = sorted({p for s in per_seed.values() for p in s["phases"] if "rl" in p})
    latent_phases = [p for p in rl_phases if p.startswith("latent")]
    plot_curves(runs, rl_phases, "train/reward", out_dir / "reward_curves.png", "train/reward (mean over seeds)")
    plot_curves(runs, latent_phases, "train/codes_used", out_dir / "codes_used.png",
                "codes in use during latent RL rollouts")
    plot_bars(rows, "ratio", out_dir / "ratio.png", "judge score ratio (mean ± std over seeds)")
    plot_bars(rows, "diversity", out_dir / "diversity.png", "rollout semantic diversity (TF-IDF encoder)")
    control_table = reward_vs_control(runs, rl_phases)
    agents = {r["agent"] for s in per_seed.values() for r in s["eval"]}
    paired_tables = {b: paired_rows(per_seed, b) for b in (baselines or ["SFT", "BC (latent)"]) if b in agents}
    paired = []
    for baseline, table in paired_tables.items():
        paired += [f"## Judge score ratio minus {baseline}'s on the same seed (mean ± std over seeds)", "",
                   markdown_table(table, list(table[0])) if table else "(no other agent)", ""]
    text = "\n".join([
        f"## Judge score ratio ({len(seeds)} seeds: mean ± std over seeds)", "", _table(rows, "ratio"), "",
        *paired,
        "## Training reward gained over a frozen control (lr = 0, same prompts; mean ± std over seeds)", "",
        markdown_table(control_table, list(control_table[0])) if control_table else "(no control phases)", "",
        "## Rollout semantic diversity (1 + mean pairwise cosine distance, TF-IDF encoder)", "",
        _table(rows, "diversity"), "", "## distinct-2", "", _table(rows, "distinct_2"), "",
        "## Stage 1: inverse dynamics and world model (final validation metrics, mean ± std over seeds)", "",
        markdown_table(phase_rows(per_seed, "inverse_dynamics"), ["phase", *PHASE_METRICS["inverse_dynamics"]]),
        "", "## Behaviour cloning (final validation metrics, mean ± std over seeds)", "",
        markdown_table(phase_rows(per_seed, "bc"), ["phase", *PHASE_METRICS["bc"]]), "",
        "Plots: reward_curves.png, codes_used.png, ratio.png, diversity.png", ""])
    (out_dir / "results.md").write_text(text)
    phases = {kind: phase_rows(per_seed, kind) for kind in PHASE_METRICS}
    record = {"seeds": seeds, "rows": rows, "paired": paired_tables, "reward_vs_control": control_table,
              "phases": phases}
    (out_dir / "results.json").write_text(json.dumps(record, indent=2, default=str))
    print(text)
    return {"rows": rows}
