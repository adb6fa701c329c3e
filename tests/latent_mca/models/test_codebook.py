import math

import pytest
import torch
import torch.nn.functional as F

from latent_mca.models.codebook import Codebook, CodebookConfig, code_usage_stats, straight_through_sample

D, K = 32, 8


def make():
    torch.manual_seed(0)
    return Codebook(CodebookConfig(hidden_size=D, num_codes=K))


def test_embed_and_embed_soft_agree_on_one_hots():
    book = make()
    idx = torch.tensor([[0, 3, 7], [5, 5, 1]])
    vec = book.embed(idx)
    assert vec.shape == (2, 3, D)
    assert torch.equal(vec[1, 0], book.weight[5])
    torch.testing.assert_close(book.embed_soft(F.one_hot(idx, K).float()), vec)
    # A soft mixture is the weighted sum of rows.
    mix = torch.zeros(K)
    mix[1], mix[2] = 0.25, 0.75
    torch.testing.assert_close(book.embed_soft(mix), 0.25 * book.weight[1] + 0.75 * book.weight[2])


def test_bad_inputs_raise():
    book = make()
    with pytest.raises(IndexError, match=r"\[0, 8\)"):
        book.embed(torch.tensor([8]))
    with pytest.raises(ValueError, match="num_codes"):
        book.embed_soft(torch.zeros(3, K + 1))
    with pytest.raises(ValueError, match="tau"):
        straight_through_sample(torch.zeros(K), tau=0.0)


def test_straight_through_sample_is_hard_in_value_and_soft_in_gradient():
    torch.manual_seed(0)
    book = make()
    logits = torch.randn(4, 5, K, requires_grad=True)
    one_hot, index = straight_through_sample(logits, tau=2.0)
    assert one_hot.shape == (4, 5, K) and index.shape == (4, 5)
    assert torch.equal(one_hot.detach(), F.one_hot(index, K).float())
    target = torch.randn(4, 5, D)
    (book.embed_soft(one_hot) - target).square().sum().backward()
    assert logits.grad.abs().sum() > 0
    used_rows = book.weight.grad.abs().sum(-1) > 0
    assert torch.equal(used_rows, torch.bincount(index.flatten(), minlength=K) > 0)


def test_sampled_codes_follow_the_softmax_of_the_logits():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0]).expand(40000, 3)
    _, index = straight_through_sample(logits, tau=2.0)  # Gumbel-max: the temperature does not change the law
    freq = torch.bincount(index, minlength=3).float() / index.numel()
    torch.testing.assert_close(freq, logits[0].softmax(-1), rtol=0, atol=0.01)


def test_soft_sample_is_a_distribution():
    weights, index = straight_through_sample(torch.randn(6, K), hard=False)
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))
    assert torch.equal(index, weights.argmax(-1))
    assert ((weights > 0) & (weights < 1)).all()


def test_code_usage_stats_hand_computed():
    stats = code_usage_stats(torch.tensor([0, 0, 1, 1]), num_codes=4)
    torch.testing.assert_close(stats["perplexity"], torch.tensor(2.0))
    assert stats["used"] == 2
    stats = code_usage_stats(torch.arange(4).repeat(3), num_codes=4)
    torch.testing.assert_close(stats["perplexity"], torch.tensor(4.0))
    # Counts 3:1 -> entropy -(0.75 ln 0.75 + 0.25 ln 0.25).
    stats = code_usage_stats(torch.tensor([[2, 2, 2, 5, 7]]), num_codes=8, mask=torch.tensor([[1, 1, 1, 1, 0]]))
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    torch.testing.assert_close(stats["perplexity"], torch.tensor(expected))
    assert stats["used"] == 2
    empty = code_usage_stats(torch.tensor([1, 2]), num_codes=4, mask=torch.tensor([0, 0]))
    assert empty["perplexity"] == 0 and empty["used"] == 0
    with pytest.raises(ValueError, match="num_codes=4"):
        code_usage_stats(torch.tensor([4]), num_codes=4)
