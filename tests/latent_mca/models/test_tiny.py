import hashlib

import pytest
import torch
from PIL import Image

from latent_mca.models.backbone import Backbone
from latent_mca.models.tiny import TinyBackboneSpec, build_tiny_backbone
from tests.helpers.vlm_families import CORPUS

SPEC = TinyBackboneSpec(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, vision_depth=1, vision_hidden_size=32, image_size=56)


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_tiny_backbone_round_trip_and_determinism(tmp_path):
    a = build_tiny_backbone(tmp_path / "a", CORPUS, SPEC, seed=3)
    b = build_tiny_backbone(tmp_path / "b", list(reversed(CORPUS)), SPEC, seed=3)
    c = build_tiny_backbone(tmp_path / "c", CORPUS, SPEC, seed=4)
    assert digest(a) == digest(b), "same seed and corpus must give identical files"
    assert digest(a)["model.safetensors"] != digest(c)["model.safetensors"]

    bb = Backbone.from_pretrained(str(a))
    assert not any(p.requires_grad for p in bb.parameters())
    proc = bb.processor
    assert proc.tokenizer.convert_ids_to_tokens(bb.image_token_id) == "<|image_pad|>"
    assert proc.tokenizer.convert_ids_to_tokens(bb.eos_token_ids) == ["<|im_end|>"]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do you see?"}]},
            {"role": "assistant", "content": "I see a red circle at the center."}]
    text = proc.apply_chat_template(msgs, tokenize=False)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What do you see?<|im_end|>")
    enc = proc(text=[text], images=[Image.new("RGB", (56, 56), "red")], return_tensors="pt")
    assert int((enc["input_ids"] == bb.image_token_id).sum()) == (56 // 28) ** 2
    vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        h1 = bb(enc["input_ids"], enc["attention_mask"], vision)
    bb.save_pretrained(tmp_path / "again")
    again = Backbone.from_pretrained(str(tmp_path / "again"))
    with torch.no_grad():
        assert torch.equal(again(enc["input_ids"], enc["attention_mask"], vision), h1)


def test_spec_validation():
    with pytest.raises(ValueError, match="multiple of 28"):
        TinyBackboneSpec(image_size=90)
    with pytest.raises(ValueError, match="corpus is empty"):
        build_tiny_backbone("/tmp/never-written", [], SPEC)
