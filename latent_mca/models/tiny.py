"""The embedded default backbone: a tiny Qwen2.5-VL built from a config, with no download.

:func:`build_tiny_backbone` trains a byte-level BPE tokenizer (``tokenizers`` library) on a text corpus,
adds Qwen's chat special tokens, pairs it with the Qwen2-VL image processor (small images, multiples of
28 px) and a Qwen-style chat template, builds a randomly initialised Qwen2.5-VL from a small config, and
saves everything with ``save_pretrained``. The result is loaded back through exactly the path a real
checkpoint uses: ``Backbone.from_pretrained(out_dir)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from latent_mca.models.backbone import BackboneConfig, build_model_from_config

#: Qwen's chat special tokens, in Qwen's id order (ids are assigned after the BPE vocabulary is trained).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

#: A Qwen2.5-VL style chat template: structured content (image / text items) or plain strings.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyBackboneSpec:
    """Sizes of the tiny Qwen2.5-VL.

    Attributes:
        vocab_size: Target BPE vocabulary size (special tokens included).
        hidden_size: Text hidden size ``d``.
        intermediate_size: Text MLP width.
        num_layers: Text decoder layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (grouped-query attention).
        vision_depth: Vision transformer blocks.
        vision_hidden_size: Vision width.
        image_size: Side of the (square) images the processor resizes to, a multiple of 28.
        max_position_embeddings: Longest sequence.
    """

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 64
    image_size: int = 84
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        if self.image_size % 28:
            raise ValueError(f"image_size must be a multiple of 28 pixels for Qwen2.5-VL, got {self.image_size}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("head dimension must be a multiple of 4 for the multimodal RoPE sections")


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> object:
    """Train a byte-level BPE tokenizer with Qwen's chat special tokens.

    Args:
        corpus: Training texts.
        vocab_size: Vocabulary size, special tokens included.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with pad = ``<|endoftext|>`` and eos = ``<|im_end|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(set(corpus)), trainer)  # sorted: the result must not depend on input order
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=4096,
        padding_side="right",
    )


def build_tiny_processor(tokenizer: object, image_size: int) -> object:
    """Pair a tokenizer with the Qwen2-VL image processor and the chat template.

    Args:
        tokenizer: The tokenizer from :func:`train_tokenizer`.
        image_size: Square image side in pixels (multiple of 28); images are resized to it.

    Returns:
        A ``Qwen2_5_VLProcessor``.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(
        min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen2_5_vl_config(spec: TinyBackboneSpec, tokenizer: object) -> object:
    """The transformers config of the tiny model, token ids read from the tokenizer.

    Args:
        spec: Model sizes.
        tokenizer: The trained tokenizer.

    Returns:
        A ``Qwen2_5_VLConfig``.
    """
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_heads
    half = head_dim // 2  # mrope sections split the rotary half-dimension into (t, h, w)
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    vocab = len(tokenizer)
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=spec.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            tie_word_embeddings=True,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_hidden_size * 2,
            num_heads=max(1, spec.vision_hidden_size // 32),
            out_hidden_size=spec.hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[spec.vision_depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )


def build_tiny_backbone(out: str | Path, corpus: Iterable[str], spec: TinyBackboneSpec | None = None,
                        seed: int = 0) -> Path:
    """Build and save the embedded default backbone.

    Args:
        out: Output directory (created); it becomes a ``from_pretrained`` path.
        corpus: Texts to train the tokenizer on (the synthetic world's text).
        spec: Model sizes (defaults: hidden 128, 4 layers, 1024-token vocabulary, 84 px images).
        seed: Seed of the random initialisation; the same seed and corpus give identical files.

    Returns:
        The output directory.
    """
    from transformers import GenerationConfig

    spec = spec or TinyBackboneSpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(corpus)
    if not texts:
        raise ValueError("the tokenizer corpus is empty: pass texts (e.g. the synthetic world's corpus.txt)")
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    processor = build_tiny_processor(tokenizer, spec.image_size)
    config = tiny_qwen2_5_vl_config(spec, tokenizer)
    with torch.random.fork_rng():
        model = build_model_from_config(config, seed=seed)
    model.generation_config = GenerationConfig(
        eos_token_id=[config.eos_token_id], pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "latent_mca_tiny.json").write_text(json.dumps({"spec": asdict(spec), "seed": seed}, indent=2))
    return out


def tiny_backbone_config(path: str | Path) -> BackboneConfig:
    """A frozen :class:`BackboneConfig` pointing at a tiny backbone directory."""
    return BackboneConfig(path=str(path))
