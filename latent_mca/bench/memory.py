"""The memory benchmark: peak resident memory of each demo phase's training step, one fresh process per phase.

Each phase runs in its own ``python -m latent_mca.bench.memory`` child, so that nothing another phase
allocated (a second backbone, allocator pools, library caches) is counted. The child builds the phase
module from the bench's backbone exactly as ``fit`` would (``configure_model``; BC and latent RL start from
exports written once by an earlier child), encodes one batch of the phase's kind, runs one warm-up
training step (optimiser state is allocated there) and then ``steps`` more. It reports, from Linux's
``/proc/self/status``:

* ``rss_after_setup``: resident set after the warm-up step (interpreter, torch, transformers, weights,
  optimiser state, the batch) -- what the phase holds between steps;
* ``step_peak``: how far the resident set rose above that during the measured steps (``VmHWM`` after a
  ``clear_refs`` reset, minus ``VmRSS``, after ``gc`` and glibc ``malloc_trim``) -- activations, gradients,
  the rollout for RL phases and temporaries of one steady-state step;
* ``process_peak``: the child's own high-water mark over its whole life (``VmHWM`` before the reset, and
  after the steps), setup and the warm-up step included.

``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: Linux carries the parent's peak across ``fork`` + ``exec``
into it (a child of a 1.5 GB parent reports 1.5 GB), whereas ``VmHWM`` belongs to the child's own address
space. Resident memory is process-wide and page-granular; it counts what the step touched, not tensor bytes
alone.

Phases and their step (sizes from the bench preset; rows per step in the record):

* ``sft``: token loss on the image-text and text-only views of a mixed batch, backbone ``trainable=all``;
* ``projector``: :meth:`ProjectorModule.losses` on ``2 x batch_size`` paired samples;
* ``inverse_dynamics``: :meth:`InverseDynamicsModule.losses` on ``batch_size`` paired + text-only samples;
* ``bc``: :meth:`BCModule.losses` on the same mixed batch;
* ``latent_rl``: a rollout of ``G`` replies per prompt, :meth:`LatentRLModule.code_logp`, GRPO loss;
* ``token_rl``: HF ``generate`` with ``G`` samples, :meth:`TokenRLModule.token_logp`, GRPO loss,
  backbone ``trainable=all``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from latent_mca.bench.common import BenchContext, BenchSizes

PHASES = ("sft", "projector", "inverse_dynamics", "bc", "latent_rl", "token_rl")
METHOD = ("per phase, a fresh child process; rss_after_setup = VmRSS after one warm-up step; step_peak = VmHWM "
          "(reset by clear_refs after gc + malloc_trim) minus that VmRSS over the measured steps; process_peak = "
          "the child's VmHWM over its life (imports, setup and warm-up included; not ru_maxrss, which inherits "
          "the parent's peak through fork + exec); Linux resident memory, process-wide, page-granular")
LR = 1e-6


# ---------------------------------------------------------------------------------------------- parent
def bench_memory(ctx: BenchContext, phases: tuple[str, ...] = PHASES, steps: int = 2) -> dict[str, Any]:
    """Peak memory of one training step of each phase, each in a fresh process.

    Args:
        ctx: Sizes, backbone and settings (``seed``; the thread count is passed on).
        phases: Which phases to measure.
        steps: Measured steps per phase (after one warm-up step).

    Returns:
        The result record (``phases``: phase -> measurements in bytes).
    """
    exports = ctx.path.parent / f"exports-{ctx.size}"
    job = {"path": str(ctx.path), "sizes": dataclasses.asdict(ctx.sizes), "seed": ctx.seed, "steps": steps,
           "threads": torch.get_num_threads(), "exports": str(exports)}
    if {"bc", "latent_rl"} & set(phases):
        _run_child({**job, "phase": "exports"})
    results = {phase: _run_child({**job, "phase": phase}) for phase in phases}
    return {"benchmark": "memory", "kind": "memory", "size": ctx.size, "description":
            "peak resident memory of one training step per demo phase (fresh process each)",
            "method": METHOD, "steps": steps, "phases": results, "sizes": dataclasses.asdict(ctx.sizes),
            "target": None, "passed": None}


def _run_child(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "latent_mca.bench.memory", json.dumps(job)], capture_output=True,
                          text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory bench: the {job['phase']!r} child failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def format_memory(result: dict[str, Any]) -> str:
    """A Markdown table of a memory record (MiB)."""
    from latent_mca.eval.records import markdown_table

    mib = 2.0 ** 20
    rows = [{"phase": phase, "rows": r["rows"], "trainable": r["trainable_params"],
             "setup": r["rss_after_setup_bytes"] / mib, "step": r["step_peak_bytes"] / mib,
             "peak": r["process_peak_bytes"] / mib} for phase, r in result["phases"].items()]
    columns = {"phase": "phase", "rows": "rows/step", "trainable": "trainable params",
               "setup": "RSS after setup MiB", "step": "step peak above it MiB", "peak": "process peak MiB"}
    head = f"### memory ({result['size']}): {result['description']}\n\n"
    return head + markdown_table(rows, columns, digits=1) + f"\n\n{result['method']}\n"


# ---------------------------------------------------------------------------------------------- child
def _sizes(raw: dict[str, Any]) -> BenchSizes:
    from latent_mca.models.tiny import TinyBackboneSpec

    return BenchSizes(**{**raw, "backbone": TinyBackboneSpec(**raw["backbone"])})


def _optimiser(module: Any) -> Callable[[Callable[[], torch.Tensor]], Callable[[], None]]:
    """Configure ``module`` as ``fit`` would and return a maker of one optimisation step from a loss closure."""
    module.configure_model()
    module.train()
    optimizer = module.configure_optimizers()

    def make(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()
        return step

    return make


def _mixed(backbone: Any, sizes: BenchSizes, seed: int, paired: int | None = None) -> Any:
    from latent_mca.bench.common import conversations
    from latent_mca.bench.stage1 import mixed_batch

    b, p = sizes.batch_size, paired or sizes.batch_size
    convs = conversations(p + b, sizes.backbone.image_size, seed)
    return mixed_batch(backbone, convs[:p], convs[p:])


def _stage1(job: dict[str, Any], sizes: BenchSizes, phase: str) -> tuple[Callable[[], None], int, Any]:
    from latent_mca.models import BackboneConfig
    from latent_mca.phases.bc import BCModule
    from latent_mca.phases.projector import ProjectorModule
    from latent_mca.phases.sft import supervised_views, token_loss

    opt = functools.partial(torch.optim.AdamW, lr=LR)
    path, seed, b = job["path"], job["seed"], sizes.batch_size
    if phase == "sft":
        module = _sft_module(path, opt)
        make = _optimiser(module)
        batch = _mixed(module.backbone, sizes, seed)

        def sft_loss() -> torch.Tensor:
            parts = [token_loss(module.backbone, view) for view in supervised_views(batch)]
            return sum(loss * n for loss, _, n in parts) / max(1, sum(n for _, _, n in parts))
        return make(sft_loss), 2 * b, module
    if phase == "projector":
        module = ProjectorModule(BackboneConfig(path=path), optimizer=opt)
        make = _optimiser(module)
        batch = _mixed(module.backbone, sizes, seed, paired=2 * b).paired
        return make(lambda: module.losses(batch)["loss"]), 2 * b, module
    if phase == "inverse_dynamics":
        module = _inverse_module(path, sizes, opt)
    else:
        module = BCModule(BackboneConfig(path=path), init_from=str(Path(job["exports"]) / "inverse_dynamics"),
                          policy_layers=sizes.policy_layers, policy_heads=sizes.policy_heads, optimizer=opt)
    make = _optimiser(module)
    batch = _mixed(module.backbone, sizes, seed)
    losses = module.losses
    return make(lambda: _first(losses(batch))["loss"]), 2 * b, module


def _first(out: Any) -> dict[str, torch.Tensor]:
    return out[0] if isinstance(out, tuple) else out


def _sft_module(path: str, opt: Any) -> Any:
    from latent_mca.models import BackboneConfig
    from latent_mca.phases.sft import SFTModule

    return SFTModule(BackboneConfig(path=path, trainable="all"), optimizer=opt)


def _inverse_module(path: str, sizes: BenchSizes, opt: Any) -> Any:
    from latent_mca.models import BackboneConfig
    from latent_mca.phases.inverse_dynamics import InverseDynamicsModule

    return InverseDynamicsModule(BackboneConfig(path=path), num_codes=sizes.num_codes,
                                 inverse_layers=sizes.inverse_layers, inverse_heads=sizes.inverse_heads,
                                 merge_blocks=sizes.merge_blocks, optimizer=opt)


def _rl(job: dict[str, Any], sizes: BenchSizes, phase: str) -> tuple[Callable[[], None], int, Any]:
    """One RL training step: the rollout, then the GRPO update (random advantages stand in for rewards)."""
    from latent_mca.bench.common import conversations, generation_prompts
    from latent_mca.bench.rl_step import full_sequence
    from latent_mca.models import BackboneConfig
    from latent_mca.models.agent import SamplingConfig
    from latent_mca.phases.latent_rl import LOGP_FLOOR, LatentRLModule
    from latent_mca.phases.token_rl import TokenRLModule
    from latent_mca.rl.losses import policy_loss
    from latent_mca.rl.rewards.world import world_reward
    from latent_mca.rl.update import RLConfig

    b, g, t = sizes.batch_size, sizes.group_size, sizes.new_tokens
    rl = RLConfig(algorithm="grpo", num_generations=g, max_new_tokens=t)
    opt = functools.partial(torch.optim.AdamW, lr=LR)
    if phase == "latent_rl":
        module = LatentRLModule(BackboneConfig(path=job["path"]), init_from=str(Path(job["exports"]) / "bc"),
                                reward=world_reward(), rl=rl, optimizer=opt)
    else:
        module = TokenRLModule(BackboneConfig(path=job["path"], trainable="all"), reward=world_reward(), rl=rl,
                               optimizer=opt)
    make = _optimiser(module)
    prompts = generation_prompts(module.backbone, conversations(b, sizes.backbone.image_size, job["seed"]))
    advantages = torch.randn(b * g, generator=torch.Generator().manual_seed(job["seed"]))
    mask = torch.ones(b * g, t)

    def loss(logp: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        return policy_loss(logp, old, None, advantages, mask, algorithm=rl.algorithm, epsilon_low=rl.epsilon_low,
                           epsilon_high=rl.epsilon_high, beta=0.0, max_completion_length=t,
                           num_items_in_batch=mask.sum())[0]

    def latent_loss() -> torch.Tensor:
        module.policy.eval()
        rollout = module.agent.generate(prompts, SamplingConfig(max_new_tokens=t, min_new_tokens=t), num_samples=g)
        module.policy.train()
        return loss(module.code_logp(module.policy, rollout), rollout.code_logp.clamp_min(LOGP_FLOOR))

    def token_loss() -> torch.Tensor:
        completion = module.backbone.generate(prompts.input_ids, prompts.attention_mask, prompts.vision,
                                              max_new_tokens=t, min_new_tokens=t, num_return_sequences=g)
        full = full_sequence(prompts.repeat_interleave(g), completion)
        return loss(module.token_logp(module.backbone, full, prompts.input_ids.shape[1], completion), None)

    return make(latent_loss if phase == "latent_rl" else token_loss), b * g, module


def _write_exports(job: dict[str, Any], sizes: BenchSizes) -> dict[str, Any]:
    """Freshly initialised inverse-dynamics and BC exports for the phases that start from one."""
    from latent_mca.checkpoint import save_phase
    from latent_mca.models import BackboneConfig
    from latent_mca.phases.bc import BCModule

    out = Path(job["exports"])
    inverse = _inverse_module(job["path"], sizes, torch.optim.AdamW)
    inverse.configure_model()
    save_phase(out / "inverse_dynamics", "inverse_dynamics", inverse.export_modules(), inverse.backbone,
               extra={"use_projector": True})
    bc = BCModule(BackboneConfig(path=job["path"]), init_from=str(out / "inverse_dynamics"),
                  policy_layers=sizes.policy_layers, policy_heads=sizes.policy_heads)
    bc.configure_model()
    save_phase(out / "bc", "bc", bc.export_modules(), bc.backbone, parent=bc.parent, extra={"use_projector": True})
    return {"exports": str(out)}


def _status_bytes(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {name}")


def _measure(job: dict[str, Any]) -> dict[str, Any]:
    """Build the phase, run one warm-up step, then measure ``steps`` steps (runs in the child)."""
    from latent_mca.bench import _quiet
    from latent_mca.bench.common import _release_free_memory

    _quiet()
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    sizes, phase = _sizes(job["sizes"]), job["phase"]
    if phase == "exports":
        return _write_exports(job, sizes)
    build = _rl if phase in ("latent_rl", "token_rl") else _stage1
    step, rows, module = build(job, sizes, phase)
    step()  # warm-up: optimiser state and allocator pools exist from here on
    life_peak = _status_bytes("VmHWM")  # imports, setup and the warm-up step
    _release_free_memory()
    setup = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the next reading is the steps' peak
    for _ in range(job["steps"]):
        step()
    step_peak = _status_bytes("VmHWM")
    return {"rows": rows, "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "rss_after_setup_bytes": setup, "step_peak_bytes": max(0, step_peak - setup),
            "process_peak_bytes": max(life_peak, step_peak)}


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))), flush=True)
