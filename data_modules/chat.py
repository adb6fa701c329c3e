"""Decoding conversation samples into items and items into the typed batches of :mod:`latent_mca.batch`.

Shared by every chat data module: :class:`ChatCodec` loads the backbone's processor lazily (once per worker
process), validates a sample's messages, encodes its views with :class:`~data_modules.collate.ChatEncoder`
and pads lists of items into batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from data_modules.collate import ChatEncoder, Encoded, SampleError, align_text_view, count_images, strip_images
from data_modules.collate import with_reply
from latent_mca.batch import ChatInputs, DialogueBatch, PairedBatch, TextBatch

ROLES = ("system", "user", "assistant")


@dataclass
class PairedItem:
    """A paired sample: both views and their alignment."""

    key: str
    vt: Encoded
    text: Encoded
    align: Tensor  # (Lt,)
    valid: Tensor  # (Lt,) bool


@dataclass
class TextItem:
    """A text-only sample."""

    key: str
    text: Encoded


@dataclass
class DialogueItem:
    """A dialogue prompt with its reference."""

    key: str
    prompt: Encoded
    full: Encoded | None
    reference: str
    messages: list[dict[str, Any]]
    image: Any
    metadata: dict[str, Any] = field(default_factory=dict)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate the ``messages`` of a sample.

    Raises:
        SampleError: ``bad_messages`` or ``unknown_role``.
    """
    if not isinstance(messages, list) or not messages:
        raise SampleError("bad_messages", "messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SampleError("bad_messages", f"message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise SampleError("unknown_role", f"message {i} has role {m['role']!r}")
        if not isinstance(m["content"], str | list):
            raise SampleError("bad_messages", f"message {i} content must be a string or a list of items")
    return messages


class ChatCodec:
    """Encode samples with the backbone's processor.

    Args:
        processor: Path (or hub id) of the backbone whose processor and special tokens to use.
        max_length: Longest sequence; longer samples are skipped and counted (``too_long``).
        assistant_only: Labels on assistant turns only.
    """

    def __init__(self, processor: str, max_length: int = 1024, assistant_only: bool = True) -> None:
        self.processor_path = processor
        self.max_length = max_length
        self.assistant_only = assistant_only
        self._encoder: ChatEncoder | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_encoder"] = None  # workers load their own copy
        return state

    @property
    def encoder(self) -> ChatEncoder:
        """Return the encoder, loading the processor on first use."""
        if self._encoder is None:
            from latent_mca.models.backbone import load_processor, load_special_tokens

            processor = load_processor(self.processor_path)
            special = load_special_tokens(self.processor_path, processor)
            self._encoder = ChatEncoder(processor, special, self.max_length, self.assistant_only)
        return self._encoder

    def load(self) -> None:
        """Load the processor now (in the main process) so a bad path fails at setup, naming it.

        Raises:
            FileNotFoundError: If the processor cannot be loaded from ``processor``.
        """
        try:
            self.encoder
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"data.init_args.processor={self.processor_path!r} cannot be loaded as a processor: {exc}") from exc

    # ------------------------------------------------------------------ items
    def paired(self, key: str, messages: list[dict[str, Any]], image: Any) -> PairedItem:
        """Encode both views of an image-text conversation."""
        if count_images(messages) != 1:
            raise SampleError("image_count", f"paired samples need one image item, got {count_images(messages)}")
        enc = self.encoder
        vt = enc.encode(messages, [image])
        text = enc.encode(strip_images(messages), [])
        align, valid = align_text_view(vt.input_ids, text.input_ids, enc.special.image_segment_ids)
        return PairedItem(key, vt, text, align, valid)

    def text(self, key: str, messages: list[dict[str, Any]]) -> TextItem:
        """Encode a text-only conversation."""
        if count_images(messages):
            raise SampleError("image_count", "a text-only sample holds an image item")
        return TextItem(key, self.encoder.encode(messages, []))

    def dialogue(self, key: str, meta: dict[str, Any], image: Any, with_full: bool) -> DialogueItem:
        """Encode a dialogue prompt (and prompt + reference for SFT)."""
        messages = check_messages(meta.get("messages"))
        if messages[-1]["role"] != "user":
            raise SampleError("bad_messages", "a dialogue context must end with a user turn")
        reference = meta.get("reference")
        if not isinstance(reference, str):
            raise SampleError("bad_messages", "a dialogue sample needs a string 'reference'")
        images = [image] if image is not None else []
        prompt = self.encoder.encode(messages, images, add_generation_prompt=True, with_labels=False)
        full = self.encoder.encode(with_reply(messages, reference), images) if with_full else None
        metadata = {k: v for k, v in meta.items() if k not in ("messages", "reference")}
        metadata.update(meta.get("facts", {}) if isinstance(meta.get("facts"), dict) else {})
        return DialogueItem(key, prompt, full, reference, messages, image, metadata)

    # ------------------------------------------------------------------ batches
    def paired_batch(self, items: list[PairedItem]) -> PairedBatch:
        """Pad paired items."""
        enc = self.encoder
        vt = enc.pad([it.vt for it in items])
        text = enc.pad([it.text for it in items])
        length = text.input_ids.shape[1]
        align = torch.zeros((len(items), length), dtype=torch.long)
        valid = torch.zeros((len(items), length), dtype=torch.bool)
        for row, it in enumerate(items):
            align[row, : it.align.numel()] = it.align
            valid[row, : it.valid.numel()] = it.valid
        return PairedBatch(vt=vt, text=text, align_vt=align, align_mask=valid, keys=[it.key for it in items])

    def text_batch(self, items: list[TextItem]) -> TextBatch:
        """Pad text-only items."""
        return TextBatch(text=self.encoder.pad([it.text for it in items]), keys=[it.key for it in items])

    def dialogue_batch(self, items: list[DialogueItem]) -> DialogueBatch:
        """Pad dialogue items (prompts on the left, full conversations on the right)."""
        enc = self.encoder
        prompt: ChatInputs = enc.pad([it.prompt for it in items], padding_side="left")
        prompt.labels = None
        full = enc.pad([it.full for it in items]) if items and items[0].full is not None else None
        return DialogueBatch(prompt=prompt, full=full, references=[it.reference for it in items],
                             messages=[it.messages for it in items], images=[it.image for it in items],
                             metadata=[it.metadata for it in items], keys=[it.key for it in items])
