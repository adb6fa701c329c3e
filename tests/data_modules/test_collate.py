import pytest
import torch
from PIL import Image

from data_modules.collate import ChatEncoder, SampleError, align_text_view, strip_images, with_reply
from latent_mca.batch import IGNORE_INDEX
from tests.helpers.vlm_families import qwen2_5_vl


@pytest.fixture(scope="module")
def backbone():
    return qwen2_5_vl()


@pytest.fixture(scope="module")
def encoder(backbone):
    return ChatEncoder(backbone.processor, backbone.special_tokens, max_length=256)


def conversation(question="What do you see?", reply="I see a red circle at the center."):
    return [
        {"role": "system", "content": "You are Captain Red."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Where is it?"},
        {"role": "assistant", "content": "At the top left."},
    ]


def image(color="red"):
    return Image.new("RGB", (56, 56), color)


def test_assistant_only_labels_cover_exactly_the_replies(encoder, backbone):
    enc = encoder.encode(conversation(), [image()])
    tok = backbone.tokenizer
    kept = enc.labels[enc.labels != IGNORE_INDEX]
    assert tok.decode(kept) == "I see a red circle at the center.<|im_end|>At the top left.<|im_end|>"
    assert not torch.isin(enc.labels, torch.tensor(backbone.image_segment_token_ids)).any()
    everything = ChatEncoder(backbone.processor, backbone.special_tokens, assistant_only=False).encode(
        conversation(), [image()])
    masked = everything.labels == IGNORE_INDEX
    assert torch.equal(masked, torch.isin(everything.input_ids, torch.tensor(backbone.image_segment_token_ids)))


def test_pad_right_and_left_with_vision(encoder, backbone):
    a = encoder.encode(conversation(), [image()])
    b = encoder.encode(conversation("Hello there! What colour is the big shape?"), [image("blue")])
    right = encoder.pad([a, b])
    left = encoder.pad([a, b], padding_side="left")
    n_a, n_b = a.input_ids.numel(), b.input_ids.numel()
    assert n_a != n_b
    assert right.input_ids.shape == left.input_ids.shape == (2, max(n_a, n_b))
    short = 0 if n_a < n_b else 1
    assert right.attention_mask[short, -1] == 0 and left.attention_mask[short, 0] == 0
    assert right.vision["pixel_values"].shape[0] == a.vision["pixel_values"].shape[0] * 2
    assert right.vision["image_grid_thw"].shape == (2, 3)
    assert right.vision["mm_token_type_ids"].shape == right.input_ids.shape
    # The padded batch runs through the backbone and equals the unpadded rows.
    with torch.no_grad():
        h = backbone(left.input_ids, left.attention_mask, left.vision)
        single = backbone(a.input_ids[None], torch.ones(1, n_a, dtype=torch.long),
                          {"pixel_values": a.vision["pixel_values"], "image_grid_thw": a.vision["image_grid_thw"],
                           "mm_token_type_ids": a.vision["mm_token_type_ids"][None]})
    row = h[0, -n_a:] if left.attention_mask[0, 0] == 0 else h[0]
    torch.testing.assert_close(row, single[0], rtol=1e-4, atol=1e-5)


def test_text_view_alignment_maps_every_text_token(encoder, backbone):
    msgs = conversation()
    vt = encoder.encode(msgs, [image()])
    text = encoder.encode(strip_images(msgs), [])
    align, valid = align_text_view(vt.input_ids, text.input_ids, backbone.special_tokens.image_segment_ids)
    assert valid.all() and align.shape == text.input_ids.shape
    assert torch.equal(vt.input_ids[align], text.input_ids)
    assert not text.vision.get("pixel_values")
    # Fallback path: a perturbed text view still aligns only identical tokens.
    perturbed = torch.cat([text.input_ids[:5], torch.tensor([7, 7]), text.input_ids[5:]])
    align, valid = align_text_view(vt.input_ids, perturbed, backbone.special_tokens.image_segment_ids)
    assert int(valid.sum()) == text.input_ids.numel()
    assert torch.equal(vt.input_ids[align[valid]], perturbed[valid])


def test_generation_prompt_and_reply(encoder, backbone):
    prompt = conversation()[:2]
    p = encoder.encode(prompt, [image()], add_generation_prompt=True, with_labels=False)
    assert backbone.tokenizer.decode(p.input_ids).endswith("<|im_start|>assistant\n")
    assert (p.labels == IGNORE_INDEX).all()
    full = encoder.encode(with_reply(prompt, "Aye, a red circle."), [image()])
    assert torch.equal(full.input_ids[: p.input_ids.numel()], p.input_ids)


def test_bad_samples_raise_sample_errors(backbone):
    enc = ChatEncoder(backbone.processor, backbone.special_tokens, max_length=10)
    with pytest.raises(SampleError) as err:
        enc.encode(conversation(), [image()])
    assert err.value.reason == "too_long"
    with pytest.raises(SampleError) as err:
        enc.encode(conversation(), [])
    assert err.value.reason == "image_count"
