"""The stage-1 benchmark: one inverse-dynamics training step against encoding the same batch.

Ours is one optimisation step of :class:`~latent_mca.phases.inverse_dynamics.InverseDynamicsModule` on a
mixed batch (``B`` paired conversations, their text views and ``B`` text-only conversations):
``losses`` (three frozen backbone passes, inverse model, straight-through codes, world model, projector NLL
and cycle terms), backward, AdamW step. The baseline is what no stage-1 step can avoid: the frozen
backbone's forward passes over the same three views. The ratio is the cost of learning the latent action
space on top of merely reading the data; it has no target.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from latent_mca.batch import MixedBatch, PairedBatch, TextBatch
from latent_mca.bench.common import BenchContext, Conversation, chat_encoder, conversations
from latent_mca.models import Backbone, BackboneConfig


def mixed_batch(backbone: Backbone, paired: list[Conversation], text_only: list[Conversation]) -> MixedBatch:
    """Encode a stage-1 batch the way the data pipeline does (right padding, assistant-only labels).

    Args:
        backbone: The backbone whose processor encodes the conversations.
        paired: Conversations used as image-text pairs (and, without the image, as their text views).
        text_only: Conversations used as text-only data (the scene in words).

    Returns:
        The batch.
    """
    from data_modules.collate import align_text_view, strip_images, with_reply

    encoder = chat_encoder(backbone)
    segment = backbone.special_tokens.image_segment_ids
    vt_items = [encoder.encode(with_reply(c.messages, c.reply), [c.image]) for c in paired]
    text_items = [encoder.encode(strip_images(with_reply(c.messages, c.reply))) for c in paired]
    vt, text = encoder.pad(vt_items), encoder.pad(text_items)
    align_vt = torch.zeros(text.input_ids.shape, dtype=torch.long)  # (B, Lt)
    align_mask = torch.zeros(text.input_ids.shape, dtype=torch.bool)
    for row, (v, t) in enumerate(zip(vt_items, text_items)):
        index, valid = align_text_view(v.input_ids, t.input_ids, segment)
        align_vt[row, : index.numel()], align_mask[row, : valid.numel()] = index, valid
    only = encoder.pad([encoder.encode(with_reply(c.text_messages, c.reply)) for c in text_only])
    return MixedBatch(paired=PairedBatch(vt, text, align_vt, align_mask), text_only=TextBatch(only))


def bench_stage1(ctx: BenchContext) -> dict[str, Any]:
    """Time of one InverseDynamicsModule step vs the frozen backbone's forward passes over the same batch.

    Args:
        ctx: Sizes, backbone and measurement settings.

    Returns:
        The result record.
    """
    from latent_mca.phases.inverse_dynamics import InverseDynamicsModule
    from latent_mca.phases.states import encode

    sizes = ctx.sizes
    module = InverseDynamicsModule(
        BackboneConfig(path=str(ctx.path)), num_codes=sizes.num_codes, inverse_layers=sizes.inverse_layers,
        inverse_heads=sizes.inverse_heads, merge_blocks=sizes.merge_blocks,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-6))
    module.configure_model()
    module.train()
    optimizer = module.configure_optimizers()
    convs = conversations(2 * sizes.batch_size, sizes.backbone.image_size, ctx.seed)
    batch = mixed_batch(module.backbone, convs[: sizes.batch_size], convs[sizes.batch_size:])
    views = [batch.paired.vt, batch.paired.text, batch.text_only.text]

    def ours() -> None:
        terms, _ = module.losses(batch)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()

    def baseline() -> None:
        for view in views:
            encode(module.backbone, view)

    tokens = int(sum(int(v.attention_mask.sum()) for v in views))
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return ctx.measure(
        "stage1", "one inverse-dynamics training step vs frozen forward passes over the same batch", ours,
        baseline,
        {"ours": "InverseDynamicsModule.losses + backward + AdamW (paired + text view + text-only)",
         "baseline": "frozen backbone forward over the same three views"},
        tokens=tokens,
        sizes={"view_lengths": [int(v.input_ids.shape[1]) for v in views], "trainable_params_ours": trainable},
        notes=["no target: the ratio is the overhead of training the latent modules on top of encoding the data",
               "tokens/s = non-padding tokens of the three views per s"])
