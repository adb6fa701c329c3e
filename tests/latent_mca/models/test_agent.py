import pytest
import torch

from data_modules.collate import ChatEncoder
from latent_mca.models.agent import LatentAgent, SamplingConfig
from latent_mca.models.policy import code_logprobs
from tests.helpers.latent import latent_modules
from tests.helpers.vlm_families import qwen2_5_vl
from tests.latent_mca.models.test_backbone import QUESTIONS


@pytest.fixture(scope="module")
def agent():
    torch.manual_seed(0)
    bb = qwen2_5_vl()
    mods = latent_modules(bb.hidden_size)
    with torch.no_grad():  # make the world model non-trivial so codes matter
        for p in mods["world_model"].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return LatentAgent(bb, mods["policy"], mods["codebook"], mods["world_model"]).eval()


@pytest.fixture(scope="module")
def prompts(agent):
    from PIL import Image

    enc = ChatEncoder(agent.backbone.processor, agent.backbone.special_tokens)
    items = [enc.encode([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                        [Image.new("RGB", (56, 56), c)], add_generation_prompt=True, with_labels=False)
             for q, c in zip(QUESTIONS, ("red", "blue"))]
    return enc.pad(items, padding_side="left")


def test_cached_decoding_equals_recomputation(agent, prompts):
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=4)
    fast = agent.generate(prompts, cfg, num_samples=3, generator=torch.Generator().manual_seed(1))
    slow = agent.generate(prompts, cfg, num_samples=3, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert fast.tokens.shape[0] == 6
    assert torch.equal(fast.codes, slow.codes) and torch.equal(fast.tokens, slow.tokens)
    torch.testing.assert_close(fast.states, slow.states, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.code_logp, slow.code_logp, rtol=1e-4, atol=1e-5)


def test_codes_drive_the_tokens_and_logps_are_recomputable(agent, prompts):
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=0.9)
    roll = agent.generate(prompts, cfg, num_samples=4, generator=torch.Generator().manual_seed(2))
    # Each token is the world model's argmax given the state before it and the code.
    before = torch.cat([roll.prompt_states[:, -1:], roll.states[:, :-1]], dim=1)  # (N, T, d)
    expected = agent._suppress_image_tokens(agent.token_logits(before, roll.codes)).argmax(-1)
    live = roll.mask.bool()
    assert torch.equal(roll.tokens[live], expected[live])
    # The policy update recomputes the same log-probabilities from the recorded states, without the backbone.
    states, mask, offset = roll.policy_inputs()
    logits = agent.policy(states, mask)[:, offset:]
    logp = code_logprobs(logits, roll.codes, cfg.temperature, cfg.top_k, cfg.top_p)
    torch.testing.assert_close(logp[live], roll.code_logp[live], rtol=1e-4, atol=1e-5)
    # Several samples per prompt explore different codes.
    assert not torch.equal(roll.codes[0], roll.codes[1]) or not torch.equal(roll.codes[1], roll.codes[2])


def force_eos_after(agent, steps, rows=slice(None)):
    """Make the world model's head put the end-of-turn token on top of ``rows`` from call ``steps`` on (a hook)."""
    eos = agent.backbone.eos_token_ids[0]
    calls = []

    def hook(module, args, logits):
        calls.append(1)
        if len(calls) > steps:
            logits = logits.clone()
            logits[rows, eos] = 1e4
        return logits

    return agent.backbone.lm_head.register_forward_hook(hook), calls


def test_stops_at_end_of_turn(agent, prompts):
    eos = agent.backbone.eos_token_ids[0]
    handle, calls = force_eos_after(agent, 2)  # the world model ends every reply at its third token
    try:
        roll = agent.generate(prompts, SamplingConfig(max_new_tokens=8), num_samples=2)
        assert len(calls) == 3  # one head call per step: the hook saw every step
        assert roll.tokens.shape[1] == 3 and roll.finished.all()
        assert roll.lengths.tolist() == [3, 3, 3, 3]
        assert (roll.tokens[:, -1] == eos).all()
        calls.clear()
        truncated = agent.generate(prompts, SamplingConfig(max_new_tokens=2), num_samples=1)
        assert not truncated.finished.any() and truncated.lengths.tolist() == [2, 2]
    finally:
        handle.remove()


def test_min_new_tokens_holds_back_the_end_of_turn(agent, prompts):
    eos = agent.backbone.eos_token_ids[0]
    handle, calls = force_eos_after(agent, 0)  # end of turn on top from the very first token
    try:
        roll = agent.generate(prompts, SamplingConfig(max_new_tokens=6, min_new_tokens=4), num_samples=1)
        assert roll.lengths.tolist() == [5, 5] and roll.finished.all()  # 4 held back, the 5th ends the turn
        assert not (roll.tokens[:, :4] == eos).any() and (roll.tokens[:, 4] == eos).all()
        calls.clear()
        fixed = agent.generate(prompts, SamplingConfig(max_new_tokens=5, min_new_tokens=5), num_samples=1)
        assert fixed.lengths.tolist() == [5, 5] and not fixed.finished.any()
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingConfig(min_new_tokens=-1)


def test_image_segment_tokens_never_appear(agent, prompts):
    segment = agent.backbone.image_segment_token_ids
    logits = torch.zeros(2, agent.backbone.vocab_size)
    logits[:, segment] = 1e4  # the raw head would pick an image token
    suppressed = agent._suppress_image_tokens(logits)
    assert torch.isinf(suppressed[:, segment]).all() and (logits[:, segment] == 1e4).all()  # input untouched
    others = torch.ones(agent.backbone.vocab_size, dtype=torch.bool)
    others[segment] = False
    assert torch.equal(suppressed[:, others], logits[:, others])
    roll = agent.generate(prompts, SamplingConfig(max_new_tokens=4), num_samples=2)
    assert not torch.isin(roll.tokens, torch.tensor(segment)).any()


def repeated_prompt_logits(policy, roll):
    """The reference: every row's prompt and completion through the policy in one causal pass."""
    states, mask, offset = roll.policy_inputs()
    return policy(states, mask)[:, offset:]


@pytest.mark.parametrize("num_samples", [1, 3])
def test_policy_logits_encode_each_prompt_once_with_the_same_values_and_gradients(agent, prompts, num_samples):
    handle, _ = force_eos_after(agent, 1, rows=0)  # row 0 ends at its second token, the others run on
    try:
        roll = agent.generate(prompts, SamplingConfig(max_new_tokens=5, top_k=4), num_samples=num_samples,
                              generator=torch.Generator().manual_seed(3))
    finally:
        handle.remove()
    assert roll.num_samples == num_samples and roll.prompt_group_size() == num_samples
    assert roll.lengths[0] == 2 and roll.lengths[1:].eq(5).all()  # right padding after the end of row 0
    policy = agent.policy
    grads = []
    for compute in (repeated_prompt_logits, lambda p, r: r.policy_logits(p)):
        policy.zero_grad()
        logits = compute(policy, roll)
        logp = code_logprobs(logits, roll.codes, 1.0, 4)
        (logp.clamp_min(-30) * roll.mask).sum().backward()
        grads.append((logits.detach(), [p.grad.clone() for p in policy.parameters()]))
    (ref, ref_grads), (fast, fast_grads) = grads
    assert fast.shape == roll.codes.shape + (policy.config.num_codes,)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Sampling log-probabilities are reproduced from the prompt-once logits too.
    live = roll.mask.bool()
    logp = code_logprobs(fast, roll.codes, 1.0, 4)
    torch.testing.assert_close(logp[live], roll.code_logp[live], rtol=1e-4, atol=1e-5)


def test_policy_logits_ignore_a_wrong_group_hint(agent, prompts):
    import dataclasses

    roll = agent.generate(prompts, SamplingConfig(max_new_tokens=3), num_samples=2,
                          generator=torch.Generator().manual_seed(4))
    swapped = torch.tensor([0, 2, 1, 3])  # rows 0 and 1 now hold different prompts
    mixed = dataclasses.replace(roll, **{f: getattr(roll, f)[swapped] for f in (
        "prompt_states", "prompt_mask", "tokens", "mask", "states", "codes", "code_logp", "finished")})
    assert mixed.num_samples == 2 and mixed.prompt_group_size() == 1
    with torch.no_grad():
        torch.testing.assert_close(mixed.policy_logits(agent.policy), repeated_prompt_logits(agent.policy, mixed),
                                   rtol=1e-5, atol=1e-5)


def test_rollouts_of_different_lengths_stack_into_one_update_batch(agent, prompts):
    """The DAPO refill stacks rollouts of different prompt and reply lengths: each part keeps its logits."""
    from latent_mca.batch import ChatInputs
    from latent_mca.models.agent import LatentRollout

    r = int(prompts.attention_mask.sum(1).argmin())  # the shorter prompt, without its left padding
    pad = int((prompts.attention_mask[r] == 0).sum())
    assert pad > 0
    one = prompts.select(torch.tensor([r]))
    short = ChatInputs(one.input_ids[:, pad:], one.attention_mask[:, pad:],
                       vision=dict(one.vision, mm_token_type_ids=one.vision["mm_token_type_ids"][:, pad:]))
    a = agent.generate(prompts, SamplingConfig(max_new_tokens=5, top_k=4), num_samples=2,
                       generator=torch.Generator().manual_seed(5))
    b = agent.generate(short, SamplingConfig(max_new_tokens=3, top_k=4), num_samples=2,
                       generator=torch.Generator().manual_seed(6))
    assert a.prompt_states.shape[1] > b.prompt_states.shape[1] and a.tokens.shape[1] > b.tokens.shape[1]
    kept = LatentRollout.cat([a.select(torch.tensor([2, 3])), b])  # group 1 of a, then b's only group
    assert kept.tokens.shape == (4, 5) and kept.prompt_group_size() == 2
    assert torch.equal(kept.mask[2:, 3:], torch.zeros(2, 2, dtype=kept.mask.dtype))  # right padding is masked
    assert torch.equal(kept.prompt_mask[2:, :pad], torch.zeros(2, pad, dtype=kept.prompt_mask.dtype))  # left pad
    with torch.no_grad():
        together = kept.policy_logits(agent.policy)
        alone = [a.policy_logits(agent.policy)[2:], b.policy_logits(agent.policy)]
    live = kept.mask.bool()
    torch.testing.assert_close(together[:2][live[:2]], alone[0][live[:2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[2:, :3][live[2:, :3]], alone[1][live[2:, :3]], rtol=1e-5, atol=1e-5)
    logp = code_logprobs(together, kept.codes, 1.0, 4)
    torch.testing.assert_close(logp[live], kept.code_logp[live], rtol=1e-4, atol=1e-5)
