"""The typed batch contract shared by ``data_modules`` (producers) and ``latent_mca.phases`` (consumers).

Every data module yields one of the dataclasses below; every phase consumes them. Lightning moves
dataclasses of tensors to the device field by field, so no phase has to know how a batch was built.

Conventions:
    * ``labels`` follow the Hugging Face convention: ``labels[b, t]`` is the target for the token *at*
      position ``t`` (``-100`` = ignored); next-token losses shift by one (:func:`next_token_targets`).
    * Training views are right-padded; generation prompts are left-padded (``DialogueBatch.prompt``).
    * ``vision`` holds the processor's image outputs exactly as the backbone's model expects them
      (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids`` for Qwen, ``pixel_values`` for LLaVA,
      ...); it is empty for text-only inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class ChatInputs:
    """One tokenised view of a batch of conversations.

    Attributes:
        input_ids: Token ids, shape ``(B, L)``.
        attention_mask: 1 for real tokens, 0 for padding, shape ``(B, L)``.
        labels: Per-position targets (``IGNORE_INDEX`` where no loss applies), shape ``(B, L)``, or None.
        vision: Processor image outputs keyed by the model's argument names; empty when text-only.
    """

    input_ids: Tensor  # (B, L) long
    attention_mask: Tensor  # (B, L) long/bool
    labels: Tensor | None = None  # (B, L) long, IGNORE_INDEX where masked
    vision: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return int(self.input_ids.shape[0])

    @property
    def has_images(self) -> bool:
        """Whether the view carries image inputs."""
        return bool(self.vision)

    def repeat_interleave(self, repeats: int) -> ChatInputs:
        """Repeat every row ``repeats`` times (rows grouped), image inputs included.

        Qwen-style flattened patches (``pixel_values`` with ``image_grid_thw``) are split per image and
        repeated image by image; per-row tensors are repeated along dim 0. One image per row is assumed
        for flattened patches.
        """
        if repeats == 1:
            return self
        chunks = self._image_chunks()  # patches of each image (None: per-row tensors)
        vision = {}
        for key, value in self.vision.items():
            if key == "pixel_values" and chunks is not None:
                vision[key] = torch.cat([c for c in chunks for _ in range(repeats)])
            else:
                vision[key] = value.repeat_interleave(repeats, dim=0)
        labels = None if self.labels is None else self.labels.repeat_interleave(repeats, dim=0)
        return ChatInputs(self.input_ids.repeat_interleave(repeats, dim=0),
                          self.attention_mask.repeat_interleave(repeats, dim=0), labels, vision)

    def _image_chunks(self) -> list[Tensor] | None:
        """Qwen-style flattened patches split per image (one image per row), or None for per-row tensors."""
        grid = self.vision.get("image_grid_thw")
        if grid is None or "pixel_values" not in self.vision:
            return None
        if grid.shape[0] != self.batch_size:
            raise ValueError(f"flattened image patches need exactly one image per row: {grid.shape[0]} images "
                             f"for {self.batch_size} rows")
        return list(torch.split(self.vision["pixel_values"], grid.prod(-1).tolist()))

    def select(self, rows: Tensor) -> ChatInputs:
        """The given rows (a 1-D index tensor), image inputs included."""
        rows = rows.to(self.input_ids.device)
        chunks = self._image_chunks()
        vision = {k: v[rows] for k, v in self.vision.items() if chunks is None or k != "pixel_values"}
        if chunks is not None:
            picked = [chunks[i] for i in rows.tolist()]
            vision["pixel_values"] = torch.cat(picked) if picked else self.vision["pixel_values"][:0]
        labels = None if self.labels is None else self.labels[rows]
        return ChatInputs(self.input_ids[rows], self.attention_mask[rows], labels, vision)

    @staticmethod
    def cat(parts: list[ChatInputs], pad_token_id: int = 0) -> ChatInputs:
        """Stack left-padded views of different lengths into one, padding each on the left.

        Per-token tensors (``input_ids``, ``attention_mask``, ``labels`` and any vision tensor shaped like
        ``input_ids``, e.g. ``mm_token_type_ids``) are left-padded to the longest part; other image tensors are
        concatenated along dim 0 (flattened patches image by image).

        Raises:
            ValueError: If the parts do not carry the same image inputs.
        """
        if not parts:
            raise ValueError("ChatInputs.cat needs at least one part")
        keys = set(parts[0].vision)
        if any(set(p.vision) != keys for p in parts):
            raise ValueError(f"cannot stack views with different image inputs: {[sorted(p.vision) for p in parts]}")
        length = max(p.input_ids.shape[1] for p in parts)

        def left_pad(t: Tensor, width: int, value: int) -> Tensor:
            return torch.nn.functional.pad(t, (length - width, 0), value=value)

        def stack(get: Any, value: int) -> Tensor:
            return torch.cat([left_pad(get(p), p.input_ids.shape[1], value) for p in parts])

        vision = {}
        for key in keys:
            per_token = key not in ("pixel_values", "image_grid_thw")
            if per_token and all(p.vision[key].shape == p.input_ids.shape for p in parts):
                vision[key] = stack(lambda p, k=key: p.vision[k], 0)
            else:
                vision[key] = torch.cat([p.vision[key] for p in parts])
        labels = None
        if all(p.labels is not None for p in parts):
            labels = stack(lambda p: p.labels, IGNORE_INDEX)
        return ChatInputs(stack(lambda p: p.input_ids, pad_token_id), stack(lambda p: p.attention_mask, 0), labels,
                          vision)


@dataclass
class PairedBatch:
    """Image-text conversations with their text views (same conversation, image segments removed).

    ``align_vt[b, j]`` is the position in the image-text view ``vt`` that holds the same token as position
    ``j`` of the text view ``text``; ``align_mask[b, j]`` says whether that position has a partner (padding
    and tokens only in one view have none). Gathering ``e_vt`` with ``align_vt`` therefore gives states
    aligned token by token with ``e_text``.

    Attributes:
        vt: The image-text view.
        text: The text view.
        align_vt: Text-view position -> image-text-view position, shape ``(B, Lt)``.
        align_mask: Valid alignment pairs, shape ``(B, Lt)`` bool.
        keys: Sample keys, one per row.
    """

    vt: ChatInputs
    text: ChatInputs
    align_vt: Tensor  # (B, Lt) long
    align_mask: Tensor  # (B, Lt) bool
    keys: list[str] = field(default_factory=list)


@dataclass
class TextBatch:
    """Text-only conversations (or packed token blocks).

    Attributes:
        text: The tokenised conversations.
        keys: Sample keys, one per row.
    """

    text: ChatInputs
    keys: list[str] = field(default_factory=list)


@dataclass
class MixedBatch:
    """Paired and text-only samples in one optimisation step (stage 1).

    Attributes:
        paired: The paired part, or None when this batch has none.
        text_only: The text-only part, or None when text-only data are switched off.
    """

    paired: PairedBatch | None = None
    text_only: TextBatch | None = None


@dataclass
class DialogueBatch:
    """Dialogue prompts with their references, for SFT, RL and evaluation.

    Attributes:
        prompt: Left-padded prompts ending with the assistant generation prefix (no labels).
        full: Right-padded prompt + reference reply with labels (assistant-only by default), or None.
        references: Ground-truth replies, one per row.
        messages: The prompt conversations (context ending with a user turn), one per row.
        images: The decoded images (PIL), one per row, None for text-only rows.
        metadata: Per-row facts (persona, task, split, judge facts) from the sample's JSON.
        keys: Unique sample keys, one per row.
    """

    prompt: ChatInputs
    full: ChatInputs | None
    references: list[str]
    messages: list[list[dict[str, Any]]]
    images: list[Any]
    metadata: list[dict[str, Any]]
    keys: list[str] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        """Number of prompts."""
        return self.prompt.batch_size


def next_token_targets(labels: Tensor) -> Tensor:
    """Shift HF-style labels so that position ``t`` holds the target for the state at ``t``.

    Args:
        labels: Labels aligned with ``input_ids``, shape ``(B, L)``.

    Returns:
        Targets ``y[b, t] = labels[b, t + 1]`` with the last position ignored, shape ``(B, L)``.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets
