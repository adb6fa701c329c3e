"""``python -m latent_mca tiny-backbone``: build the embedded default backbone."""

from __future__ import annotations

from pathlib import Path

from latent_mca.models.tiny import TinyBackboneSpec, build_tiny_backbone


def tiny_backbone(
    out: str,
    corpus: str | None = None,
    seed: int = 0,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    intermediate_size: int = 384,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    image_size: int = 84,
) -> str:
    """Build the tiny Qwen2.5-VL backbone (tokenizer trained locally, random weights) and save it.

    Args:
        out: Output directory; afterwards it is a ``from_pretrained`` path.
        corpus: A text file (one text per line) to train the tokenizer on; default: the synthetic world's
            texts generated for ``seed``.
        seed: Seed of the weights (and of the default corpus).
        vocab_size: BPE vocabulary size, special tokens included.
        hidden_size: Text hidden size.
        intermediate_size: Text MLP width.
        num_layers: Text decoder layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads.
        vision_depth: Vision transformer blocks.
        vision_hidden_size: Vision width.
        image_size: Image side in pixels (a multiple of 28).

    Returns:
        The output directory.
    """
    spec = TinyBackboneSpec(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, vision_depth=vision_depth,
        vision_hidden_size=vision_hidden_size, image_size=image_size,
    )
    if corpus is not None:
        path = Path(corpus)
        if not path.is_file():
            raise FileNotFoundError(f"--corpus {corpus!r} is not a file")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from latent_mca.world import corpus_texts

        texts = corpus_texts(seed=seed)
    build_tiny_backbone(out, texts, spec, seed=seed)
    print(f"tiny backbone written to {out}")
    return out
