"""Script: a real phase (``configs/demo/inverse_dynamics.yaml``) through the CLI on 2 DDP processes (gloo, CPU).

Run as ``python tests/helpers/ddp_phase_run.py RUN_DIR OUT_DIR STEPS`` with ``LATENT_MCA_RUN_DIR=RUN_DIR`` and
``LATENT_MCA_PHASE`` set; RUN_DIR holds a demo world and ``sft/export`` (see ``tests/helpers/demo_run.py``).
Lightning's DDP launcher re-executes this file for rank 1, hence the ``__main__`` guard. Each rank writes the
sample keys of every batch it trained on to ``OUT_DIR/keys_rank<r>.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch

    from latent_mca.cli import main
    from tests.helpers.demo_run import demo_config, fast_overrides

    torch.set_num_threads(1)
    run_dir, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = demo_config("inverse_dynamics")
    main(["fit", "--config", config, *fast_overrides(config, steps),
          "--model.init_args.init_from=null",  # a fresh projector: no earlier phase needed
          "--data.init_args.num_workers=1", "--trainer.strategy=ddp", "--trainer.devices=2",
          "--trainer.callbacks+=tests.helpers.reliability_run.RecordBatchKeys",
          f"--trainer.callbacks.init_args.out={out}"])
