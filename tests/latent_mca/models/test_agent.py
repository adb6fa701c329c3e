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


def test_stops_at_end_of_turn(agent, prompts, monkeypatch):
    eos = agent.backbone.eos_token_ids[0]
    original = agent.token_logits

    def eos_after_two(states, codes):
        logits = original(states, codes)
        step = len(calls)
        calls.append(1)
        if step >= 2:  # the world model ends every reply at its third token
            logits[..., eos] = 1e4
        return logits

    calls = []
    monkeypatch.setattr(agent, "token_logits", eos_after_two)
    roll = agent.generate(prompts, SamplingConfig(max_new_tokens=8), num_samples=2)
    assert roll.tokens.shape[1] == 3 and roll.finished.all()
    assert roll.lengths.tolist() == [3, 3, 3, 3]
    assert (roll.tokens[:, -1] == eos).all()
    calls.clear()
    truncated = agent.generate(prompts, SamplingConfig(max_new_tokens=2), num_samples=1)
    assert not truncated.finished.any() and truncated.lengths.tolist() == [2, 2]
