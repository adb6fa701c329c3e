"""TEST ONLY: Lightning's DeepSpeedStrategy made to run on CPU processes over gloo.

Lightning 2.6 refuses DeepSpeed without CUDA. Three overrides lift that for tests, so that ZeRO-2/3
training, collective checkpoint saving, conversion and resume run on a CPU-only machine. They touch
private Lightning internals (``_init_deepspeed_distributed``), which is why this lives under ``tests/`` and
never in the package; re-check it when Lightning is upgraded (setup.cfg pins ``lightning<2.7``).
"""

from __future__ import annotations

import argparse

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` without the CUDA checks (gloo backend, CPU devices)."""

    strategy_name = "deepspeed_cpu_test"

    def setup_environment(self) -> None:
        # Skip DeepSpeedStrategy's "CUDA GPUs only" guard and run the plain DDP environment setup.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # The parent validates CUDA device indices first; CPU devices have none.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        # A CPU device has index None, which deepspeed.initialize rejects; -1 means "no local device".
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=-1),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer
