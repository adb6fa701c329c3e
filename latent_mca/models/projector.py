"""Cross-modal projectors between text-only and image-text backbone states, and their Gaussian NLL.

P (``forward_head``) maps a text-only state ``e^T_t`` to a diagonal Gaussian over the image-text state
``e^{VT}_t`` of the same token; P' (``backward_head``) maps the other way. Text-only data enter the latent
action model as pseudo-multimodal states ``P(e^T).mu``; the cycle ``P'(P(e^T).mu)`` should give back ``e^T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CrossModalProjector", "Gaussian", "GaussianHead", "ProjectorConfig", "build_projector", "gaussian_nll"]


class Gaussian(NamedTuple):
    """A diagonal Gaussian per token.

    Attributes:
        mu: Mean, shape ``(..., d)``.
        logvar: Log-variance in ``[-1, 1]``, shape ``(..., d)``.
    """

    mu: Tensor
    logvar: Tensor


@dataclass
class ProjectorConfig:
    """Sizes of a :class:`CrossModalProjector`.

    Attributes:
        hidden_size: Backbone hidden size ``d``.
        bottleneck: Width of the MLPs' hidden layer. None: ``d // 2`` (the authors' choice).
        residual: Predict the mean as ``x + MLP(x)`` with the MLP's last layer zero-initialised, so each
            projector starts as the identity: text and image-text states of the same text token are close
            (the image changes a few directions), and a from-scratch mean through a ``d/2`` bottleneck starts far
            worse than the identity. False reproduces the authors' head exactly (``mu = MLP(x)``).
    """

    hidden_size: int
    bottleneck: int | None = None
    residual: bool = True

    def __post_init__(self) -> None:
        if self.bottleneck is None:
            self.bottleneck = max(1, self.hidden_size // 2)
        if self.hidden_size <= 0 or self.bottleneck <= 0:
            raise ValueError(f"ProjectorConfig: hidden_size and bottleneck must be > 0, got {self.hidden_size}, "
                             f"{self.bottleneck}")


class GaussianHead(nn.Module):
    """Two MLPs ``d -> bottleneck -> d`` with tanh: one for the mean, one for the tanh-bounded log-variance.

    Args:
        hidden_size: Input and output width ``d``.
        bottleneck: Hidden width. None: ``d // 2``.
        residual: Mean ``x + MLP(x)`` starting at the identity (see :class:`ProjectorConfig`).
    """

    def __init__(self, hidden_size: int, bottleneck: int | None = None, residual: bool = False) -> None:
        super().__init__()
        width = bottleneck or max(1, hidden_size // 2)
        self.residual = residual
        self.mu = nn.Sequential(nn.Linear(hidden_size, width), nn.Tanh(), nn.Linear(width, hidden_size))
        if residual:
            nn.init.zeros_(self.mu[-1].weight)
            nn.init.zeros_(self.mu[-1].bias)
        # Bounding the log-variance to [-1, 1] keeps the NLL from collapsing the variance to zero.
        self.logvar = nn.Sequential(
            nn.Linear(hidden_size, width), nn.Tanh(), nn.Linear(width, hidden_size), nn.Tanh()
        )

    def forward(self, x: Tensor) -> Gaussian:
        """Map states ``(..., d)`` to a Gaussian ``(mu, logvar)``, each ``(..., d)``."""
        mu = x + self.mu(x) if self.residual else self.mu(x)
        return Gaussian(mu, self.logvar(x))


class CrossModalProjector(nn.Module):
    """P (text -> image-text) and P' (image-text -> text).

    Args:
        config: Sizes.
    """

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.forward_head = GaussianHead(config.hidden_size, config.bottleneck, config.residual)
        self.backward_head = GaussianHead(config.hidden_size, config.bottleneck, config.residual)

    def t2vt(self, e_text: Tensor) -> Gaussian:
        """P: text-only states ``(..., d)`` to a Gaussian over image-text states."""
        return self.forward_head(e_text)

    def vt2t(self, e_vt: Tensor) -> Gaussian:
        """P': image-text states ``(..., d)`` to a Gaussian over text-only states."""
        return self.backward_head(e_vt)

    def cycle(self, e_text: Tensor) -> Gaussian:
        """P'(P(e_text).mu): the round trip used for cycle consistency on text-only data."""
        return self.vt2t(self.t2vt(e_text).mu)

    def forward(self, e_text: Tensor) -> Gaussian:
        """Same as :meth:`t2vt` (the direction the latent action model uses)."""
        return self.t2vt(e_text)


def gaussian_nll(mu: Tensor, logvar: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Gaussian negative log-likelihood of ``target`` per token, summed over ``d``, averaged over masked tokens.

    Per dimension this is ``0.5 * (logvar + (mu - target)^2 / exp(logvar))`` (``F.gaussian_nll_loss`` without the
    constant ``0.5 * log(2 pi)``). The authors' code omits the ``0.5``, so their value (and the gradient) is
    exactly twice this one; multiply a loss weight by 2 to reproduce theirs (e.g. 2e-5 for their 1e-5).

    Args:
        mu: Predicted mean, shape ``(..., d)``.
        logvar: Predicted log-variance, shape ``(..., d)``.
        target: Target states ``(..., d)``; detached here (targets come from the frozen backbone).
        mask: Which tokens count, shape ``(...)`` (bool or 0/1). None: all tokens.

    Returns:
        A scalar; 0 when the mask selects no token.
    """
    if mu.shape != logvar.shape or mu.shape != target.shape:
        raise ValueError(f"gaussian_nll: mu {tuple(mu.shape)}, logvar {tuple(logvar.shape)} and target "
                         f"{tuple(target.shape)} must have the same shape")
    per_dim = F.gaussian_nll_loss(mu, target.detach(), logvar.exp(), full=False, reduction="none")
    per_token = per_dim.sum(dim=-1)  # (...)
    if mask is None:
        return per_token.mean()
    if mask.shape != per_token.shape:
        raise ValueError(f"gaussian_nll: mask shape {tuple(mask.shape)} does not match tokens "
                         f"{tuple(per_token.shape)}")
    keep = mask.to(device=per_token.device, dtype=torch.bool)
    # where() rather than a product, so a non-finite value at a padded token cannot leak in as 0 * inf.
    total = torch.where(keep, per_token, torch.zeros_like(per_token)).sum()
    return total / keep.sum().clamp(min=1).to(per_token.dtype)


def build_projector(config: ProjectorConfig) -> CrossModalProjector:
    """Build a :class:`CrossModalProjector` from its config."""
    return CrossModalProjector(config)
