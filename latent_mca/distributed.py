"""Small helpers for code that must also run under DeepSpeed ZeRO-3 (partitioned parameters)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn


def is_partitioned(module: nn.Module) -> bool:
    """Whether ZeRO-3 has partitioned this module's parameters (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def gathered(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Temporarily gather full parameters of ZeRO-3-partitioned modules (a no-op otherwise).

    Gathering is collective: every rank must enter this context, even if only rank 0 reads the weights.
    """
    params = [p for m in modules if is_partitioned(m) for p in m.parameters()]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
