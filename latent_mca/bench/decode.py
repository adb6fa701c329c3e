"""Generation benchmarks: latent decoding against the backbone's own Hugging Face ``generate``.

``decode``: greedy replies to a batch of image-text prompts. Ours is :meth:`LatentAgent.generate` (codes
sampled from the policy, tokens the world model's argmax: two KV caches, policy and world model every
step); the baseline is :meth:`Backbone.generate` (transformers' ``generate`` with its KV cache, greedy).

``rollout``: ``G`` sampled replies per prompt, as an RL step needs them. Ours samples ``G`` code sequences
from one prefill per prompt; the baseline samples tokens with ``num_return_sequences=G``.

Both sides include the prefill (vision tower and prompt) and produce exactly ``new_tokens`` tokens per
reply: both are asked for ``min_new_tokens = max_new_tokens`` (end-of-turn ids suppressed until then, the
public option of :class:`~latent_mca.models.agent.SamplingConfig` and :meth:`Backbone.generate`, which is
transformers' ``min_new_tokens``), and every call checks the length it got.
"""

from __future__ import annotations

from typing import Any

from latent_mca.bench.common import (
    BenchContext,
    Target,
    check_length,
    conversations,
    generation_prompts,
    latent_agent,
)
from latent_mca.models.agent import SamplingConfig

#: Latent decoding should keep at least 95% of the base model's tokens/s (the authors' code: ~1/1.13 = 0.88).
DECODE_TARGET = Target(op=">=", value=0.95, paper=round(1 / 1.13, 3))

FIXED_LENGTH_NOTE = ("fixed reply length: both decoders get min_new_tokens = max_new_tokens (end-of-turn ids "
                     "suppressed until then), so both run exactly new_tokens steps (checked on every call)")


def bench_decode(ctx: BenchContext) -> dict[str, Any]:
    """Tokens/s of greedy latent decoding vs the backbone's greedy ``generate`` on the same prompts.

    Args:
        ctx: Sizes, backbone and measurement settings.

    Returns:
        The result record.
    """
    sizes, backbone = ctx.sizes, ctx.backbone
    b, t = sizes.batch_size, sizes.new_tokens
    agent = latent_agent(backbone, sizes, ctx.seed)
    prompts = generation_prompts(backbone, conversations(b, sizes.backbone.image_size, ctx.seed))
    sampling = SamplingConfig(max_new_tokens=t, temperature=1.0, min_new_tokens=t)
    gen = ctx.generator()

    def ours() -> None:
        roll = agent.generate(prompts, sampling, num_samples=1, generator=gen)
        check_length("latent agent", roll.tokens.shape[1], t)

    def baseline() -> None:
        out = backbone.generate(prompts.input_ids, prompts.attention_mask, prompts.vision, max_new_tokens=t,
                                min_new_tokens=t, do_sample=False)
        check_length("Backbone.generate", out.shape[1], t)

    return ctx.measure(
        "decode", "greedy replies, latent agent vs HF generate", ours, baseline,
        {"ours": "LatentAgent.generate (codes sampled, tokens greedy)",
         "baseline": "Backbone.generate (HF, greedy, KV cache)"},
        throughput=True, tokens=b * t, target=DECODE_TARGET,
        sizes={"prompt_length": int(prompts.input_ids.shape[1])},
        notes=[FIXED_LENGTH_NOTE, "time per call includes the prefill (vision tower + prompt)"])


def bench_rollout(ctx: BenchContext) -> dict[str, Any]:
    """Time of ``G`` sampled replies per prompt: a latent rollout vs HF ``generate`` with sampling.

    Args:
        ctx: Sizes, backbone and measurement settings.

    Returns:
        The result record.
    """
    sizes, backbone = ctx.sizes, ctx.backbone
    b, g, t = sizes.batch_size, sizes.group_size, sizes.new_tokens
    agent = latent_agent(backbone, sizes, ctx.seed)
    prompts = generation_prompts(backbone, conversations(b, sizes.backbone.image_size, ctx.seed))
    sampling = SamplingConfig(max_new_tokens=t, temperature=1.0, min_new_tokens=t)
    gen = ctx.generator()

    def ours() -> None:
        roll = agent.generate(prompts, sampling, num_samples=g, generator=gen)
        check_length("latent rollout", roll.tokens.shape[1], t)

    def baseline() -> None:
        out = backbone.generate(prompts.input_ids, prompts.attention_mask, prompts.vision, max_new_tokens=t,
                                min_new_tokens=t, do_sample=True, temperature=1.0, num_return_sequences=g)
        check_length("token rollout", out.shape[1], t)

    return ctx.measure(
        "rollout", f"G={g} sampled replies per prompt, latent vs token rollout", ours, baseline,
        {"ours": "LatentAgent.generate(num_samples=G): codes sampled at temperature 1",
         "baseline": "Backbone.generate(num_return_sequences=G): tokens sampled at temperature 1"},
        tokens=b * g * t, sizes={"prompt_length": int(prompts.input_ids.shape[1])},
        notes=[FIXED_LENGTH_NOTE,
               "ours prefills each prompt once (backbone and policy) and repeats its KV caches G times; HF "
               "generate expands the prompts (and images) G times before its prefill"])
