import pytest
import torch
from PIL import Image

from latent_mca.models.backbone import Backbone, BackboneConfig, ImageTokenMismatchError
from tests.helpers.vlm_families import FAMILIES, llava, qwen2_5_vl

QUESTIONS = ["What do you see?", "Hello there! Where is the blue square? I see a red circle at the top left."]


def encode(backbone, padding_side="right", with_image=True, questions=QUESTIONS):
    proc = backbone.processor
    convs = []
    for q in questions:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": q}]
        convs.append([{"role": "user", "content": content}])
    texts = [proc.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    images = [Image.new("RGB", (56, 56), (200, 30 * i, 40)) for i in range(len(texts))] if with_image else None
    proc.tokenizer.padding_side = padding_side
    enc = proc(text=texts, images=images, return_tensors="pt", padding=True)
    vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    return enc, vision


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param]()


@torch.no_grad()
def test_hidden_states_and_logits_equal_the_models_own(family):
    name, bb = family
    enc, vision = encode(bb)
    hidden = bb(enc["input_ids"], enc["attention_mask"], vision)
    ref = bb.model(**enc, output_hidden_states=True)
    assert hidden.shape == (2, enc["input_ids"].shape[1], bb.hidden_size)
    assert (enc["attention_mask"] == 0).any(), "the test needs a right-padded row"
    real = enc["attention_mask"].bool()  # padding positions may differ (HF gives pads running positions)
    torch.testing.assert_close(hidden[real], ref.hidden_states[-1][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb.logits(hidden)[real], ref.logits[real], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_text_only_batch(family):
    name, bb = family
    enc, vision = encode(bb, with_image=False)
    hidden = bb(enc["input_ids"], enc["attention_mask"], vision)
    ref = bb.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], ref.hidden_states[-1][real], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_incremental_decoding_equals_full_forward(family):
    name, bb = family
    enc, vision = encode(bb, padding_side="left")
    assert (enc["attention_mask"] == 0).any(), "the test needs a left-padded row"
    prompt_hidden, state = bb.prefill(enc["input_ids"], enc["attention_mask"], vision)
    new = torch.randint(20, bb.vocab_size - 20, (2, 4))
    steps = []
    for i in range(new.shape[1]):
        h, state = bb.step(new[:, i], state)
        steps.append(h)
    full_ids = torch.cat([enc["input_ids"], new], dim=1)
    full_mask = torch.cat([enc["attention_mask"], torch.ones_like(new)], dim=1)
    full_vision = dict(vision)
    if "mm_token_type_ids" in vision:
        full_vision["mm_token_type_ids"] = torch.cat([vision["mm_token_type_ids"], torch.zeros_like(new)], dim=1)
    full = bb(full_ids, full_mask, full_vision)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(prompt_hidden[real], full[:, :-4][real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, -4:], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_greedy_decoding_matches_hf_generate():
    bb = qwen2_5_vl()
    enc, vision = encode(bb, padding_side="left")
    hf = bb.model.generate(**enc, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=bb.pad_token_id)
    hidden, state = bb.prefill(enc["input_ids"], enc["attention_mask"], vision)
    token = bb.logits(hidden[:, -1]).argmax(-1)
    ours = [token]
    for _ in range(4):
        h, state = bb.step(token, state)
        token = bb.logits(h[:, -1]).argmax(-1)
        ours.append(token)
    assert torch.equal(torch.stack(ours, dim=1), hf[:, -5:])


def test_repeat_interleave_state_matches_repeated_prefill():
    bb = qwen2_5_vl()
    enc, vision = encode(bb, padding_side="left")
    with torch.no_grad():
        _, state = bb.prefill(enc["input_ids"], enc["attention_mask"], vision)
        state = state.repeat_interleave(3)
        tokens = torch.arange(6) + 30
        h, _ = bb.step(tokens, state)
        ids3 = enc["input_ids"].repeat_interleave(3, 0)
        mask3 = enc["attention_mask"].repeat_interleave(3, 0)
        vision3 = {"pixel_values": vision["pixel_values"].view(2, -1, vision["pixel_values"].shape[-1])
                   .repeat_interleave(3, 0).flatten(0, 1),
                   "image_grid_thw": vision["image_grid_thw"].repeat_interleave(3, 0),
                   "mm_token_type_ids": vision["mm_token_type_ids"].repeat_interleave(3, 0)}
        _, state3 = bb.prefill(ids3, mask3, vision3)
        h3, _ = bb.step(tokens, state3)
    torch.testing.assert_close(h, h3, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", [lambda: qwen2_5_vl(processor_merge_size=1), lambda: llava(processor_patch_size=7)],
                         ids=["qwen_merge_size", "llava_patch_size"])
def test_mismatched_processor_fails_with_a_clear_message(build):
    bb = build()
    enc, vision = encode(bb)
    with pytest.raises(ImageTokenMismatchError, match=r"image placeholder tokens .* image features"):
        bb(enc["input_ids"], enc["attention_mask"], vision)


def test_frozen_by_default_and_trainable_modes():
    bb = qwen2_5_vl()
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.model.training, "a frozen backbone stays in eval mode"

    top = Backbone(bb.model, bb.processor, BackboneConfig(trainable="top_n", top_n_layers=1))
    trainable = {n for n, p in top.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.1." in n or ".norm." in n for n in trainable)
    assert not any(".layers.0." in n or "visual" in n for n in trainable)

    with pytest.raises(ValueError, match="top_n_layers"):
        Backbone(bb.model, bb.processor, BackboneConfig(trainable="top_n", top_n_layers=5))


def test_lora_trains_adapters_only_and_merges_on_save(tmp_path):
    bb = qwen2_5_vl()
    enc, vision = encode(bb)
    with torch.no_grad():
        before = bb(enc["input_ids"], enc["attention_mask"], vision)
    lora = Backbone(bb.model, bb.processor, BackboneConfig(trainable="lora", lora_r=2)).eval()
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # B is zero-initialised: before any update the adapters change nothing.
    with torch.no_grad():
        torch.testing.assert_close(lora(enc["input_ids"], enc["attention_mask"], vision), before)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
        adapted = lora(enc["input_ids"], enc["attention_mask"], vision)
    assert not torch.allclose(adapted, before)
    lora.save_pretrained(tmp_path / "merged")
    reloaded = Backbone.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(enc["input_ids"], enc["attention_mask"], vision), adapted,
                                   rtol=1e-4, atol=1e-5)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone.path"):
        Backbone.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="backbone.path is empty"):
        Backbone.from_pretrained(BackboneConfig())
