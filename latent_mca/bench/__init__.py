"""``python -m latent_mca bench <name>``: performance, always as a ratio against a baseline in the same run.

Benchmarks (``all`` runs every one, a comma-separated list runs several):

============  ================================================  ==============================================
name          ours                                              baseline
============  ================================================  ==============================================
``decode``    latent agent, greedy tokens (tokens/s)            the backbone's HF ``generate``, greedy
``rollout``   latent rollout, G samples per prompt              HF ``generate``, sampling, G sequences
``rl-step``   latent RL update (policy over recorded states)    token RL update (backbone forward + backward)
``stage1``    inverse-dynamics training step                    frozen backbone forwards over the same batch
``loader``    one loader worker producing a batch (paired,      one training step consuming it (projector,
              mixed): records ``loader-paired``/``-mixed``      inverse dynamics)
``memory``    peak resident memory of one training step per     (none: a table per phase, each phase in a
              demo phase                                        fresh process)
============  ================================================  ==============================================

Each prints a Markdown table (median seconds, tokens/s, ratio, target, pass/miss) and writes
``<out>/<record>.json`` with every raw timing, the sizes, peak memory and the machine (see
:mod:`latent_mca.bench.common` for how time and memory are measured). ``loader`` writes two records,
``memory`` a table of phases (:mod:`latent_mca.bench.memory`). Timings are never asserted in tests.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any, Literal

#: Benchmark name -> "module:function" (imported when run).
BENCHMARKS: dict[str, str] = {
    "decode": "latent_mca.bench.decode:bench_decode",
    "rollout": "latent_mca.bench.decode:bench_rollout",
    "rl-step": "latent_mca.bench.rl_step:bench_rl_step",
    "stage1": "latent_mca.bench.stage1:bench_stage1",
    "loader": "latent_mca.bench.loader:bench_loader",
    "memory": "latent_mca.bench.memory:bench_memory",
}


def _select(name: str) -> list[str]:
    names = list(BENCHMARKS) if name == "all" else [n.strip() for n in name.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(f"unknown benchmark {', '.join(unknown) or name!r}; expected 'all' or some of "
                         f"{', '.join(BENCHMARKS)}")
    return names


def _quiet() -> None:
    """Progress bars and generation-config chatter would bury the tables."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "transformers.generation", "transformers.modeling_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def bench(name: str = "all", out: str = "bench_results", repeats: int = 5, warmup: int = 1,
          size: Literal["demo", "large", "tiny"] = "demo", batch_size: int | None = None,
          new_tokens: int | None = None, group_size: int | None = None, threads: int | None = None,
          token_trainable: Literal["all", "top_n"] = "all", memory: bool = True, profile: bool = False,
          cache: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Run benchmarks, print a table per benchmark and write ``<out>/<name>.json``.

    Args:
        name: ``decode``, ``rollout``, ``rl-step``, ``stage1``, ``loader``, ``memory``, a comma-separated list,
            or ``all``.
        out: Output directory of the JSON results.
        repeats: Timed calls per side (the median is reported).
        warmup: Untimed calls per side before timing.
        size: Sizes (named ``size``, not ``config``: jsonargparse reserves ``--config`` for config files):
            ``demo`` (the embedded tiny backbone: hidden 128, 4 layers; policy and inverse model
            2 layers, 4 heads; 128 codes), ``large`` (hidden 512, 8 layers, 8 heads; policy and inverse model
            4 layers) or ``tiny`` (test sizes).
        batch_size: Prompts per batch (default: the size's, 8 for demo and large).
        new_tokens: Tokens per reply (default: 32 for demo and large).
        group_size: Samples per prompt in ``rollout`` and ``rl-step`` (default: 4 for demo and large).
        threads: torch intra-op threads (default: every CPU this process may use).
        token_trainable: Backbone parameters the token RL baseline trains: ``all`` (language model and
            ``lm_head``) or ``top_n`` with every decoder layer (the final norm too, not the embeddings).
        memory: Also measure peak resident memory of one extra call per side.
        profile: Also record the top operators (self CPU time) of one extra call per side.
        cache: Directory for the built tiny backbones (default: ``<out>/backbones``); an identical build is
            reused.
        seed: Seed of the backbone weights, prompts, latent modules and sampling.

    Returns:
        Record name -> result record (as written to JSON); ``loader`` gives ``loader-paired`` and
        ``loader-mixed``.
    """
    import torch

    from latent_mca.bench.common import (
        BenchContext,
        backbone_dir,
        environment,
        format_result,
        resolve_sizes,
        write_result,
    )

    names = _select(name)
    _quiet()
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads or available)
    sizes = resolve_sizes(size, batch_size=batch_size, new_tokens=new_tokens, group_size=group_size)
    out_dir = Path(out)
    path = backbone_dir(Path(cache) if cache else out_dir / "backbones", size, sizes.backbone, seed)
    ctx = BenchContext(size=size, sizes=sizes, path=path, seed=seed, repeats=repeats, warmup=warmup,
                       memory=memory, profile=profile, token_trainable=token_trainable)
    env = environment()
    results: dict[str, Any] = {}
    for bench_name in names:
        module, _, func = BENCHMARKS[bench_name].partition(":")
        returned = getattr(importlib.import_module(module), func)(ctx)
        for result in returned if isinstance(returned, list) else [returned]:
            result["environment"] = env
            written = write_result(out_dir, result)
            print(format_result(result))
            print(f"written to {written}\n", flush=True)
            results[result["benchmark"]] = result
    return results
