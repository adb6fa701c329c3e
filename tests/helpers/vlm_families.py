"""Tiny, randomly initialised VLMs of several families, built from configs with no download."""

from __future__ import annotations

from functools import lru_cache

from latent_mca.models.backbone import Backbone, BackboneConfig
from latent_mca.models.tiny import (
    CHAT_TEMPLATE,
    TinyBackboneSpec,
    build_tiny_processor,
    tiny_qwen2_5_vl_config,
    train_tokenizer,
)

CORPUS = [
    f"I see a {c} {s} at the {p}." for c in ("red", "blue", "green") for s in ("circle", "square")
    for p in ("top left", "center", "bottom right")
] + ["What do you see?", "Where is it?", "Hello there!"]

SMALL = TinyBackboneSpec(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, vision_depth=1, vision_hidden_size=32, image_size=56)


@lru_cache(maxsize=1)
def _qwen_tokenizer():
    return train_tokenizer(CORPUS, SMALL.vocab_size)


def qwen2_5_vl(image_size: int = 56, seed: int = 0, processor_merge_size: int | None = None) -> Backbone:
    """A tiny Qwen2.5-VL backbone (optionally with a mismatched processor merge size)."""
    tok = _qwen_tokenizer()
    proc = build_tiny_processor(tok, image_size)
    if processor_merge_size is not None:
        proc.image_processor.merge_size = processor_merge_size
    cfg = tiny_qwen2_5_vl_config(SMALL, tok)
    return Backbone.from_config(cfg, proc, BackboneConfig(), seed=seed)


def qwen2_vl(image_size: int = 56, seed: int = 0) -> Backbone:
    """A tiny Qwen2-VL backbone sharing the Qwen tokenizer."""
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = _qwen_tokenizer()
    names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in names}
    pixels = image_size * image_size
    proc = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2),
        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2),
        chat_template=CHAT_TEMPLATE,
    )
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    return Backbone.from_config(cfg, proc, BackboneConfig(), seed=seed)


LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>\n{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def llava(seed: int = 0, processor_patch_size: int = 14) -> Backbone:
    """A tiny LLaVA (CLIP vision tower + Llama) backbone, a non-Qwen family with 1-D RoPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(sorted(CORPUS + ["USER: ASSISTANT:"]), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>")
    image_proc = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    proc = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=processor_patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_TEMPLATE)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, pad_token_id=tok.pad_token_id,
    )
    return Backbone.from_config(cfg, proc, BackboneConfig(), seed=seed)


FAMILIES = {"qwen2_5_vl": qwen2_5_vl, "qwen2_vl": qwen2_vl, "llava": llava}
