"""Script: latent RL with DAPO dynamic sampling through the CLI on 2 DDP processes (gloo, CPU).

Run as ``python tests/helpers/ddp_rl_run.py RUN_DIR OUT_DIR STEPS`` with ``LATENT_MCA_RUN_DIR=RUN_DIR`` and
``LATENT_MCA_PHASE`` set; RUN_DIR holds a demo world, ``sft/export`` and ``bc/export``. The reward makes the
ranks fill their updates at different speeds (:class:`RankTies`), so they must agree on when to update.
Each rank writes the sample keys of every batch it drew to ``OUT_DIR/keys_rank<r>.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository on the path

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from latent_mca.rl.rewards.base import RewardFunction, RewardInput  # noqa: E402


class RankTies(RewardFunction):
    """Rank 0: every group has a reward spread. Rank 1: group 0 ties on even calls, every group on odd ones.

    With 2 prompts per batch and ``dynamic_sampling_max_batches = 2``, rank 0 holds a full batch after one
    draw but rank 1 holds one group after two draws: both must update after two draws, rank 1 one group short
    (and with fewer rows than rank 0 in the batch-scaled advantage gather).
    """

    name = "rank_ties"

    def __init__(self, group_size: int = 2) -> None:
        self.group_size = group_size
        self.calls = 0

    def __call__(self, inputs: Sequence[RewardInput]) -> list[float]:
        """Score by rank, call count and position only."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        call, self.calls = self.calls, self.calls + 1
        out = []
        for i in range(len(inputs)):
            group, j = divmod(i, self.group_size)
            ties = rank == 1 and (call % 2 == 1 or group == 0)
            out.append(0.5 if ties else float(j % 2 == 0))
        return out


if __name__ == "__main__":
    from latent_mca.cli import main
    from tests.helpers.demo_run import demo_config, fast_overrides

    torch.set_num_threads(1)
    run_dir, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = demo_config("latent_rl")
    main(["fit", "--config", config, *fast_overrides(config, steps),
          "--model.init_args.reward=tests.helpers.ddp_rl_run.RankTies",
          "--model.init_args.rl.algorithm=dapo", "--model.init_args.rl.dynamic_sampling=true",
          "--model.init_args.rl.dynamic_sampling_max_batches=2", "--model.init_args.rl.scale_rewards=batch",
          "--data.init_args.num_workers=1", "--trainer.strategy=ddp", "--trainer.devices=2",
          "--trainer.callbacks+=tests.helpers.reliability_run.RecordBatchKeys",
          f"--trainer.callbacks.init_args.out={out}"])
