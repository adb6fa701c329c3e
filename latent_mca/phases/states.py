"""Observation states and world-model losses shared by the stage-1 phases (plain functions, no Lightning).

Notation follows the paper: ``e^{VT}`` are the frozen backbone's final normalised states of an image-text
conversation, ``e^T`` those of its text view (same conversation, image segments removed). Text-only data
enter the latent modules as pseudo-multimodal states ``P(e^T).mu``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latent_mca.batch import IGNORE_INDEX, ChatInputs, MixedBatch, PairedBatch, next_token_targets
from latent_mca.models import Backbone, Codebook, InverseDynamics, WorldModel, code_usage_stats
from latent_mca.models.codebook import straight_through_sample
from latent_mca.models.inverse_dynamics import inverse_entropy_terms


@dataclass
class PairedStates:
    """Backbone states of a paired batch.

    Attributes:
        vt: Image-text-view states ``(B, Lv, d)``.
        text: Text-view states ``(B, Lt, d)``.
        vt_aligned: Image-text states gathered onto the text view's positions ``(B, Lt, d)``.
        mask: Text-view positions with an aligned partner ``(B, Lt)`` bool.
    """

    vt: Tensor
    text: Tensor
    vt_aligned: Tensor
    mask: Tensor


@torch.no_grad()
def encode(backbone: Backbone, inputs: ChatInputs) -> Tensor:
    """Frozen backbone states of one view, ``(B, L, d)``."""
    return backbone(inputs.input_ids, inputs.attention_mask, inputs.vision)


@torch.no_grad()
def paired_states(backbone: Backbone, batch: PairedBatch) -> PairedStates:
    """Encode both views of a paired batch and align them token by token."""
    e_vt = encode(backbone, batch.vt)
    e_t = encode(backbone, batch.text)
    index = batch.align_vt.unsqueeze(-1).expand(-1, -1, e_vt.shape[-1])  # (B, Lt, d)
    aligned = torch.gather(e_vt, 1, index)
    mask = batch.align_mask.bool() & batch.text.attention_mask.bool()
    return PairedStates(vt=e_vt, text=e_t, vt_aligned=aligned, mask=mask)


@dataclass
class WorldModelOutput:
    """Result of driving the world model with inverse-dynamics codes on one view.

    Attributes:
        loss: L_inverse, mean next-token cross-entropy through the world model.
        entropy: Entropy terms of the inverse distribution (``token_neg_entropy``, ``batch_usage_entropy``).
        codes: Sampled code per scored position ``(M,)``.
        accuracy: World-model next-token accuracy.
        base_accuracy: The frozen base model's accuracy on the same positions.
        count: Number of scored positions ``M``.
    """

    loss: Tensor
    entropy: dict[str, Tensor]
    codes: Tensor
    accuracy: Tensor
    base_accuracy: Tensor
    count: int


def scored_positions(inputs: ChatInputs, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Positions with a next-token target where the inverse model has a future, and those targets."""
    targets = next_token_targets(inputs.labels)  # (B, L)
    select = valid & (targets != IGNORE_INDEX)
    return select, targets[select]


def inverse_world_loss(states: Tensor, inputs: ChatInputs, inverse: InverseDynamics, codebook: Codebook,
                       world_model: WorldModel, lm_head: nn.Module, tau: float) -> WorldModelOutput:
    """L_inverse on one view: straight-through Gumbel codes from the inverse model drive the world model.

    Args:
        states: Observation states (real or pseudo-multimodal) ``(B, L, d)``.
        inputs: The view's tokens; its labels pick the scored positions.
        inverse: Inverse dynamics model.
        codebook: Code table.
        world_model: Merge blocks.
        lm_head: The backbone's frozen output head.
        tau: Gumbel-softmax temperature.

    Returns:
        The loss and its diagnostics.
    """
    out = inverse(states, inputs.attention_mask)
    select, targets = scored_positions(inputs, out.valid)
    logits = out.logits[select]  # (M, K): only positions that are scored reach lm_head
    one_hot, codes = straight_through_sample(logits, tau=tau, hard=True)
    e = states[select]  # (M, d)
    merged = world_model(e, codebook.embed_soft(one_hot))
    token_logits = lm_head(merged)  # (M, V)
    loss = F.cross_entropy(token_logits.float(), targets) if targets.numel() else token_logits.sum() * 0.0
    with torch.no_grad():
        accuracy = (token_logits.argmax(-1) == targets).float().mean()
        base = (lm_head(e).argmax(-1) == targets).float().mean()
    return WorldModelOutput(loss=loss, entropy=inverse_entropy_terms(logits), codes=codes, accuracy=accuracy,
                            base_accuracy=base, count=int(targets.numel()))


def usage_metrics(codes: Tensor, num_codes: int) -> dict[str, Tensor]:
    """Codes in use and code perplexity of a batch of sampled codes."""
    stats = code_usage_stats(codes, num_codes)
    return {"codes_used": stats["used"].float(), "code_perplexity": stats["perplexity"]}


def rows(batch: MixedBatch) -> int:
    """Number of conversations in a mixed batch (for logging)."""
    paired = batch.paired.text.batch_size if batch.paired is not None else 0
    text = batch.text_only.text.batch_size if batch.text_only is not None else 0
    return paired + text
