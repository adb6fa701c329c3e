"""One tiny demo run shared by the phase tests: world, backbone, and each phase run once through the CLI.

The fixtures chain the phases exactly as the demo pipeline does (sft -> projector -> inverse_dynamics ->
bc -> latent_rl; token_rl from sft); a test that needs a phase's export asks for that phase's fixture and
gets every earlier phase run first, once per test run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers.demo_run import build_demo_run, demo_config, fit_phase

#: Optimiser steps of each stage-1 CLI run: enough for the loss to fall clearly, few enough for CI.
STEPS = {"sft": 24, "projector": 24, "inverse_dynamics": 24, "bc": 24}
#: Optimiser steps of each RL CLI run (a smoke run of the whole rollout/update loop).
RL_STEPS = 2


@dataclass(frozen=True)
class PhaseRun:
    """A finished CLI run of one phase.

    Attributes:
        run_dir: The run directory.
        name: The phase name (``LATENT_MCA_PHASE``): outputs are ``<run>/<name>/export`` and ``<run>/logs/<name>``.
        steps: Optimiser steps it ran.
    """

    run_dir: Path
    name: str
    steps: int

    @property
    def export(self) -> Path:
        """The run's export directory."""
        return self.run_dir / self.name / "export"


@pytest.fixture(scope="package", autouse=True)
def single_thread() -> Iterator[None]:
    """Run torch single-threaded while these tests run.

    The tensors here are tiny, so intra-op threads buy nothing, and on a shared 2-core machine their
    spin-waiting makes every elementwise op orders of magnitude slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """World + tiny backbone; ``sft/export`` is left for the SFT run to write."""
    return build_demo_run(tmp_path_factory.mktemp("demo_run"), seed=0, copy_sft=False)


def _fit(run: Path, name: str) -> PhaseRun:
    fit_phase(run, name, demo_config(name), steps=STEPS[name])
    return PhaseRun(run, name, STEPS[name])


@pytest.fixture(scope="package")
def sft_run(run_dir: Path) -> PhaseRun:
    """``fit --config configs/demo/sft.yaml``: writes ``sft/export``, the backbone of every later phase."""
    return _fit(run_dir, "sft")


@pytest.fixture(scope="package")
def projector_run(sft_run: PhaseRun) -> PhaseRun:
    """``fit --config configs/demo/projector.yaml`` on the SFT backbone."""
    return _fit(sft_run.run_dir, "projector")


@pytest.fixture(scope="package")
def inverse_run(projector_run: PhaseRun) -> PhaseRun:
    """``fit --config configs/demo/inverse_dynamics.yaml`` from the projector export."""
    return _fit(projector_run.run_dir, "inverse_dynamics")


@pytest.fixture(scope="package")
def bc_run(inverse_run: PhaseRun) -> PhaseRun:
    """``fit --config configs/demo/bc.yaml`` from the inverse-dynamics export."""
    return _fit(inverse_run.run_dir, "bc")


@pytest.fixture(scope="package")
def rl_run(bc_run: PhaseRun) -> Callable[[str, str], PhaseRun]:
    """A runner of short RL CLI runs, one per (kind, algorithm), cached for the package.

    Call it as ``rl_run(kind, algorithm)``; ``kind`` is ``latent_rl`` (from the BC export) or ``token_rl``
    (from the SFT export); the run's phase name is ``<kind>_<algorithm>``. Token RL needs only the SFT export,
    but sharing one chain keeps this simple.
    """
    done: dict[tuple[str, str], PhaseRun] = {}

    def run(kind: str, algorithm: str) -> PhaseRun:
        if (kind, algorithm) not in done:
            name = f"{kind}_{algorithm}"
            fit_phase(bc_run.run_dir, name, demo_config(kind), [f"--model.init_args.rl.algorithm={algorithm}"],
                      steps=RL_STEPS)
            done[kind, algorithm] = PhaseRun(bc_run.run_dir, name, RL_STEPS)
        return done[kind, algorithm]

    return run
