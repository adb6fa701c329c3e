"""Turning conversations into :mod:`latent_mca.batch` tensors with the backbone's own processor.

:class:`ChatEncoder` applies the chat template and the processor to one conversation at a time, then pads a
list of encodings into a :class:`~latent_mca.batch.ChatInputs`. Labels mask padding and image-segment tokens,
and (``assistant_only``, the default) every token outside the assistant turns. :func:`align_text_view` maps
each token of a paired sample's text view (the same conversation with its image segments removed) to the
same token in the image-text view.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from latent_mca.batch import IGNORE_INDEX, ChatInputs
from latent_mca.models.backbone import SpecialTokens

Messages = list[dict[str, Any]]


class SampleError(ValueError):
    """A sample that cannot be used (too long, malformed); data modules skip and count it by ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Encoded:
    """One encoded conversation (unpadded).

    Attributes:
        input_ids: Token ids, shape ``(L,)``.
        labels: Targets at each position (``IGNORE_INDEX`` where masked), shape ``(L,)``.
        vision: Per-sample processor image outputs; sequence-aligned ones (``mm_token_type_ids``) are
            padded with the ids, the others concatenated along dim 0 when batching.
    """

    input_ids: Tensor  # (L,)
    labels: Tensor  # (L,)
    vision: dict[str, Tensor] = field(default_factory=dict)


def strip_images(messages: Messages) -> Messages:
    """The text view of a conversation: the same messages with every image item removed."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [item for item in content if not _is_image_item(item)]
        out.append({**message, "content": content})
    return out


def count_images(messages: Messages) -> int:
    """Number of image items in a conversation."""
    return sum(
        1 for m in messages if isinstance(m["content"], list) for item in m["content"] if _is_image_item(item)
    )


def _is_image_item(item: Any) -> bool:
    return isinstance(item, dict) and (item.get("type") == "image" or "image" in item)


class ChatEncoder:
    """Encode conversations with a processor's chat template into padded tensors.

    Args:
        processor: The backbone's processor (tokenizer, image processor, chat template).
        special: The backbone's special token ids (``load_special_tokens``).
        max_length: Longest allowed sequence; longer samples raise :class:`SampleError` (never truncated
            silently, since truncation could cut an image segment or the reply).
        assistant_only: Keep labels on assistant turns only (otherwise on every non-image token).
    """

    def __init__(self, processor: Any, special: SpecialTokens, max_length: int = 2048,
                 assistant_only: bool = True) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.special = special
        self.max_length = max_length
        self.assistant_only = assistant_only
        self._segment = torch.tensor(special.image_segment_ids, dtype=torch.long)

    # ------------------------------------------------------------------ one conversation
    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        """Apply the chat template without tokenising."""
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, messages: Messages, images: list[Any] | None = None, add_generation_prompt: bool = False,
               with_labels: bool = True) -> Encoded:
        """Encode one conversation.

        Args:
            messages: Chat messages (HF structured content for images).
            images: One decoded image per image item, in order.
            add_generation_prompt: Append the assistant prefix (prompts for generation).
            with_labels: Build labels (otherwise all ``IGNORE_INDEX``).

        Returns:
            The encoding.

        Raises:
            SampleError: On an image count mismatch or a sequence longer than ``max_length``.
        """
        images = list(images or [])
        n_items = count_images(messages)
        if n_items != len(images):
            raise SampleError("image_count", f"conversation has {n_items} image items but {len(images)} images")
        text = self.render(messages, add_generation_prompt)
        enc = self.processor(text=[text], images=images or None, return_tensors="pt")
        ids = enc["input_ids"][0]
        if ids.numel() > self.max_length:
            raise SampleError("too_long", f"{ids.numel()} tokens > max_length={self.max_length}")
        vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in vision:
            vision["mm_token_type_ids"] = vision["mm_token_type_ids"][0]
        labels = self._labels(messages, ids, add_generation_prompt) if with_labels else torch.full_like(
            ids, IGNORE_INDEX)
        return Encoded(input_ids=ids, labels=labels, vision=vision)

    def _labels(self, messages: Messages, ids: Tensor, add_generation_prompt: bool) -> Tensor:
        labels = ids.clone()
        labels[torch.isin(ids, self._segment)] = IGNORE_INDEX
        if not self.assistant_only:
            return labels
        keep = torch.zeros_like(ids, dtype=torch.bool)
        runs = self._image_run_lengths(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._token_length(messages[:i], True, runs, ids)
            end = self._token_length(messages[: i + 1], False, runs, ids)
            # Train on the reply and its end-of-turn token, not on the template's whitespace after it.
            eos = torch.isin(ids[start:end], torch.tensor(self.special.eos_token_ids)).nonzero().flatten()
            if eos.numel():
                end = start + int(eos[-1]) + 1
            keep[start:end] = True
        labels[~keep] = IGNORE_INDEX
        return labels

    def _image_run_lengths(self, ids: Tensor) -> list[int]:
        """Lengths of the contiguous runs of image placeholder tokens, one run per image."""
        if self.special.image_token_id is None:
            return []
        is_img = (ids == self.special.image_token_id).long()
        starts = (is_img[1:] > is_img[:-1]).nonzero().flatten().tolist()
        starts = ([0] if is_img[0] else []) + [s + 1 for s in starts]
        ends = (is_img[:-1] > is_img[1:]).nonzero().flatten().tolist()
        ends = [e + 1 for e in ends] + ([len(ids)] if is_img[-1] else [])
        return [e - s for s, e in zip(starts, ends)]

    def _token_length(self, prefix: Messages, add_generation_prompt: bool, runs: list[int], ids: Tensor) -> int:
        """Number of processed tokens the rendered prefix occupies (image placeholders expanded)."""
        text = self.render(prefix, add_generation_prompt) if prefix else ""
        raw = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        n_img = count_images(prefix)
        length = len(raw) + sum(r - 1 for r in runs[:n_img])
        # Rendering is prefix-consistent for chat templates; check it so a template that rewrites earlier
        # turns (e.g. drops reasoning) fails loudly instead of mislabelling tokens.
        expanded = _expand(raw, self.special.image_token_id, runs[:n_img])
        if ids[: len(expanded)].tolist() != expanded:
            raise SampleError("template", "the chat template is not prefix-consistent; cannot locate assistant "
                                          "turns (set assistant_only=False for this model)")
        return length

    # ------------------------------------------------------------------ batches
    def pad(self, items: list[Encoded], padding_side: str = "right") -> ChatInputs:
        """Pad encodings into one batch.

        Args:
            items: Encodings from :meth:`encode`.
            padding_side: ``right`` for training, ``left`` for generation prompts.

        Returns:
            The padded batch.
        """
        if not items:
            raise ValueError("cannot pad an empty list of encodings")
        length = max(int(it.input_ids.numel()) for it in items)
        ids = torch.full((len(items), length), self.special.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        seq_keys = {k for it in items for k, v in it.vision.items() if v.dim() == 1 and v.shape == it.input_ids.shape}
        seq = {k: torch.zeros((len(items), length), dtype=torch.long) for k in seq_keys}
        for row, it in enumerate(items):
            n = int(it.input_ids.numel())
            sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
            ids[row, sl], labels[row, sl], mask[row, sl] = it.input_ids, it.labels, 1
            for k in seq_keys:
                if k in it.vision:
                    seq[k][row, sl] = it.vision[k]
        other: dict[str, list[Tensor]] = {}
        for it in items:
            for k, v in it.vision.items():
                if k not in seq_keys:
                    other.setdefault(k, []).append(v)
        vision = {k: torch.cat(v, dim=0) for k, v in other.items()}
        if other:  # sequence-aligned keys only matter when there are images in the batch
            vision.update(seq)
        return ChatInputs(input_ids=ids, attention_mask=mask, labels=labels, vision=vision)


def _expand(raw: list[int], image_token_id: int | None, runs: list[int]) -> list[int]:
    """Expand each image placeholder in ``raw`` to its run length (the processor's expansion)."""
    if image_token_id is None or not runs:
        return list(raw)
    out: list[int] = []
    k = 0
    for t in raw:
        if t == image_token_id and k < len(runs):
            out.extend([t] * runs[k])
            k += 1
        else:
            out.append(t)
    return out


def align_text_view(vt_ids: Tensor, text_ids: Tensor, segment_ids: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Map each text-view token to the same token in the image-text view.

    The text view is the image-text conversation with its image segments removed, so removing the
    image-segment tokens from ``vt_ids`` normally yields ``text_ids`` exactly. When a tokeniser merges
    differently across the removed segment, a longest-matching-blocks alignment is used instead and the
    tokens without a partner are left unaligned.

    Args:
        vt_ids: Unpadded image-text-view ids, shape ``(Lv,)``.
        text_ids: Unpadded text-view ids, shape ``(Lt,)``.
        segment_ids: Ids of image-segment tokens.

    Returns:
        ``align`` ``(Lt,)`` (position in the image-text view, 0 where unaligned) and ``valid`` ``(Lt,)`` bool;
        ``vt_ids[align[valid]] == text_ids[valid]`` always holds.
    """
    keep = ~torch.isin(vt_ids, torch.tensor(segment_ids, dtype=vt_ids.dtype))
    kept_pos = keep.nonzero().flatten()
    if torch.equal(vt_ids[kept_pos], text_ids):
        return kept_pos, torch.ones_like(text_ids, dtype=torch.bool)
    align = torch.zeros_like(text_ids)
    valid = torch.zeros_like(text_ids, dtype=torch.bool)
    matcher = difflib.SequenceMatcher(a=vt_ids[kept_pos].tolist(), b=text_ids.tolist(), autojunk=False)
    for block in matcher.get_matching_blocks():
        if block.size:
            align[block.b: block.b + block.size] = kept_pos[block.a: block.a + block.size]
            valid[block.b: block.b + block.size] = True
    return align, valid


def with_reply(messages: Messages, reply: str) -> Messages:
    """A copy of a prompt conversation with an assistant reply appended."""
    return copy.deepcopy(messages) + [{"role": "assistant", "content": reply}]
