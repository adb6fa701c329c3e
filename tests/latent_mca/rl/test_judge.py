"""OpenAIJudge against a real local HTTP server speaking the chat-completions protocol."""

from __future__ import annotations

import base64
import io
import math
import pickle
import socket
import time

import pytest
from PIL import Image

from latent_mca.rl.rewards import (
    MMROLE_ASPECTS,
    PCOGALIGN_ASPECTS,
    JudgeReward,
    OpenAIJudge,
    RewardInput,
    parse_scores,
)
from tests.latent_mca.rl.chat_server import FakeChatServer, Reply, scores_text, user_text

MODEL, REF = "MODEL_ANSWER", "REFERENCE_ANSWER"
A_SCORES = (8, 7, 9, 6, 8, 7, 9, 5)
B_SCORES = (9, 8, 9, 9, 7, 9, 8, 9)
FAST = dict(timeout=0.5, backoff_base=0.005, backoff_max=0.02, trust_env=False)


def sample(completion: str = MODEL, key: str = "k0", image=None) -> RewardInput:
    return RewardInput(
        prompt=[{"role": "system", "content": "Be Alice."}, {"role": "user", "content": "What do you see?"}],
        completion=completion, reference=REF, image=image,
        metadata={"role_name": "Alice", "profile": {"personality": "cheerful", "catchphrase": "Oh my!"}}, key=key)


def good(payload, index) -> Reply:
    return Reply(scores_text(MMROLE_ASPECTS, A_SCORES, B_SCORES))


def model_shown_first(payload) -> bool:
    text = user_text(payload)
    return text.index(MODEL) < text.index(REF)


def position_biased(payload, index) -> Reply:
    """The model's answer deserves 8 and the reference 4, but whichever is shown first gets +1."""
    first = model_shown_first(payload)
    a, b = (9, 4) if first else (5, 8)  # (first shown, second shown)
    return Reply(scores_text(MMROLE_ASPECTS, [a] * 8, [b] * 8))


def test_good_answers_are_parsed_and_reduced(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret-123")
    with FakeChatServer(good) as server:
        judge = OpenAIJudge(server.url, "judge-model", api_key_env="TEST_JUDGE_KEY", **FAST)
        scores = judge.score([sample(key="a"), sample(key="b")])
    assert [s.a for s in scores] == [tuple(map(float, A_SCORES))] * 2
    assert scores[0].b == tuple(map(float, B_SCORES)) and scores[0].aspects == MMROLE_ASPECTS
    ratio = sum(A_SCORES) / sum(B_SCORES)
    mean_ratio = sum(a / (b + 1e-6) for a, b in zip(A_SCORES, B_SCORES)) / 8
    assert scores[0].ratio_of_sums() == pytest.approx(ratio)
    assert scores[0].mean_of_ratios() == pytest.approx(mean_ratio)
    req = server.received[0]
    assert req.path == "/v1/chat/completions"
    assert req.payload["model"] == "judge-model" and req.payload["temperature"] == 0
    assert req.headers["Authorization"] == "Bearer secret-123"
    assert model_shown_first(req.payload)  # the model's answer is A by default
    assert "secret-123" not in repr(judge)
    assert judge.stats()["scored"] == 2 and judge.stats()["calls"] == 2


def test_judge_reward_uses_ratio_of_sums_or_mean_of_ratios():
    with FakeChatServer(good) as server:
        judge = OpenAIJudge(server.url, "m", api_key_env=None, **FAST)
        ros = JudgeReward(judge)([sample()])
        mor = JudgeReward(judge, reduce="mean_of_ratios")([sample()])
    assert ros == [pytest.approx(sum(A_SCORES) / sum(B_SCORES))]
    assert mor == [pytest.approx(sum(a / (b + 1e-6) for a, b in zip(A_SCORES, B_SCORES)) / 8)]
    assert "Authorization" not in server.received[0].headers


def test_malformed_answers_give_nan_never_zero():
    replies = {
        "SEVEN": scores_text(MMROLE_ASPECTS[:7], A_SCORES, B_SCORES),
        "NINE": scores_text(MMROLE_ASPECTS, A_SCORES, B_SCORES) + "\nExtra: [Scores]: (1, 1)",
        "GARBAGE": "I think answer A is better overall.",
        "OUTOFRANGE": scores_text(MMROLE_ASPECTS, (11,) + A_SCORES[1:], B_SCORES),
        "GOOD": scores_text(MMROLE_ASPECTS, A_SCORES, B_SCORES),
    }

    def behaviour(payload, index):
        text = user_text(payload)
        return Reply(next(v for k, v in replies.items() if f"{MODEL}_{k}" in text))

    with FakeChatServer(behaviour) as server:
        judge = OpenAIJudge(server.url, "m", api_key_env=None, **FAST)
        rewards = JudgeReward(judge)([sample(f"{MODEL}_{k}", key=k) for k in replies])
    assert all(math.isnan(r) for r in rewards[:4])
    assert rewards[4] == pytest.approx(sum(A_SCORES) / sum(B_SCORES))
    assert judge.stats()["parse_errors"] == 4 and judge.stats()["unscored"] == 4
    assert judge.stats().get("retries", 0) == 0  # a well-delivered but unparseable reply is not re-asked


def test_garbled_body_is_a_bad_response():
    with FakeChatServer(lambda p, i: Reply(body=b"<html>gateway error</html>")) as server:
        judge = OpenAIJudge(server.url, "m", api_key_env=None, max_retries=1, **FAST)
        assert judge.score([sample()]) == [None]
    assert judge.stats()["failures/bad_response"] == 2 and judge.stats()["retries"] == 1


def test_timeout_gives_nan_after_retries_within_bounded_time():
    with FakeChatServer(lambda p, i: Reply(scores_text(MMROLE_ASPECTS, A_SCORES, B_SCORES), delay=3.0)) as server:
        judge = OpenAIJudge(server.url, "m", api_key_env=None, max_retries=1, **{**FAST, "timeout": 0.2})
        start = time.monotonic()
        rewards = JudgeReward(judge)([sample()])
        elapsed = time.monotonic() - start
    assert math.isnan(rewards[0])
    assert elapsed < 1.5
    assert judge.stats()["failures/timeout"] == 2 and judge.stats()["retries"] == 1
    assert len(server.received) == 2


def test_5xx_then_success_is_retried_and_counted():
    def behaviour(payload, index):
        return Reply(status=503, body=b'{"error": "overloaded"}') if index < 2 else good(payload, index)

    with FakeChatServer(behaviour) as server:
        judge = OpenAIJudge(server.url, "m", api_key_env=None, max_retries=3, **FAST)
        scores = judge.score([sample()])
    assert scores[0] is not None and scores[0].a == tuple(map(float, A_SCORES))
    stats = judge.stats()
    assert stats["failures/http_5xx"] == 2 and stats["retries"] == 2 and stats["calls"] == 3
    assert stats["requests"] == 1


@pytest.mark.parametrize("header", [("Retry-After", "0.3"), ("retry-after-ms", "300")])
def test_429_honours_retry_after(header):
    def behaviour(payload, index):
        return Reply(status=429, body=b"{}", headers=dict([header])) if index == 0 else good(payload, index)

    with FakeChatServer(behaviour) as server:
        judge = OpenAIJudge(server.url, "m", api_key_env=None, max_retries=2, **FAST)
        scores = judge.score([sample()])
    assert scores[0] is not None
    assert server.received[1].arrived - server.received[0].arrived >= 0.28
    assert judge.stats()["failures/http_429"] == 1


def test_4xx_is_not_retried():
    with FakeChatServer(lambda p, i: Reply(status=400, body=b'{"error": "bad"}')) as server:
        judge = OpenAIJudge(server.url, "m", api_key_env=None, max_retries=3, **FAST)
        assert judge.score([sample()]) == [None]
    assert len(server.received) == 1 and judge.stats()["failures/http_4xx"] == 1


def test_concurrency_bound_is_respected():
    def behaviour(payload, index):
        return Reply(scores_text(MMROLE_ASPECTS, A_SCORES, B_SCORES), delay=0.1)

    with FakeChatServer(behaviour) as server:
        judge = OpenAIJudge(server.url, "m", api_key_env=None, max_concurrency=3, **FAST)
        scores = judge.score([sample(key=str(i)) for i in range(9)])
    assert all(s is not None for s in scores)
    assert 2 <= server.max_active <= 3


def test_circuit_breaker_trips_and_recovers():
    state = {"healthy": False}

    def behaviour(payload, index):
        return good(payload, index) if state["healthy"] else Reply(status=500, body=b"{}")

    with FakeChatServer(behaviour) as server:
        judge = OpenAIJudge(server.url, "m", api_key_env=None, max_retries=0, max_concurrency=1,
                            breaker_threshold=3, breaker_cooldown=0.4, **FAST)
        assert judge.score([sample(key=str(i)) for i in range(5)]) == [None] * 5
        assert len(server.received) == 3  # the last two were refused without calling
        assert judge.stats()["breaker_trips"] == 1 and judge.stats()["breaker_rejections"] == 2
        state["healthy"] = True
        assert judge.score([sample()]) == [None]  # still cooling down
        assert len(server.received) == 3
        time.sleep(0.45)
        recovered = judge.score([sample(key="x"), sample(key="y")])
    assert all(s is not None for s in recovered)
    assert len(server.received) == 5 and judge.stats()["breaker_trips"] == 1


def test_connection_refused_gives_nan():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, max_retries=1, **FAST)
    assert judge.score([sample()]) == [None]
    assert judge.stats()["failures/connection"] == 2


def test_swap_both_sends_both_orders_and_removes_position_bias():
    with FakeChatServer(position_biased) as server:
        fixed = OpenAIJudge(server.url, "m", api_key_env=None, **FAST).score([sample()])[0]
        n_fixed = len(server.received)
        both = OpenAIJudge(server.url, "m", api_key_env=None, swap="both", **FAST).score([sample()])[0]
    orders = [model_shown_first(r.payload) for r in server.received[n_fixed:]]
    assert sorted(orders) == [False, True]
    assert fixed.a == (9.0,) * 8 and fixed.b == (4.0,) * 8  # biased towards the model shown first
    assert both.a == (8.5,) * 8 and both.b == (4.5,) * 8  # model (9 + 8) / 2, reference (4 + 5) / 2


def test_swap_random_unswaps_scores():
    with FakeChatServer(position_biased) as server:
        judge = OpenAIJudge(server.url, "m", api_key_env=None, swap="random", max_concurrency=1, **FAST)
        scores = judge.score([sample(key=str(i)) for i in range(16)])
    firsts = [model_shown_first(r.payload) for r in server.received]
    assert 0 < sum(firsts) < 16
    for s, first in zip(scores, firsts):
        assert (s.a[0], s.b[0]) == ((9.0, 4.0) if first else (8.0, 5.0))


def test_image_is_sent_only_when_enabled():
    image = Image.new("RGB", (28, 56), (200, 10, 10))
    with FakeChatServer(good) as server:
        OpenAIJudge(server.url, "m", api_key_env=None, show_image=True, **FAST).score([sample(image=image)])
        OpenAIJudge(server.url, "m", api_key_env=None, **FAST).score([sample(image=image)])
    shown, hidden = (r.payload["messages"][-1]["content"] for r in server.received)
    assert isinstance(hidden, str)
    parts = {p["type"]: p for p in shown}
    assert MODEL in parts["text"]["text"]
    url = parts["image_url"]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (28, 56) and decoded.convert("RGB").getpixel((3, 3)) == (200, 10, 10)


def test_pcogalign_style_scores_five_aspects():
    meta = {"individual_RoleSet": {"school": "teacher", "home": "parent"},
            "eval_info": {"ImageDesc": "a rainy street", "EvalHelp": "be brief and kind", "location": "street"}}

    def behaviour(payload, index):
        return Reply(scores_text(PCOGALIGN_ASPECTS, (6, 7, 8, 9, 10), (5, 5, 5, 5, 5)))

    inp = RewardInput([{"role": "user", "content": "Should I run?"}], MODEL, REF, metadata=meta, key="p0")
    with FakeChatServer(behaviour) as server:
        judge = OpenAIJudge(server.url, "m", api_key_env=None, prompt_style="pcogalign", **FAST)
        scores = judge.score([inp])
    assert judge.aspects == PCOGALIGN_ASPECTS
    assert scores[0].ratio_of_sums() == pytest.approx(40 / 25)
    assert user_text(server.received[0].payload).endswith("Interviewee: ")


def test_missing_metadata_names_the_sample():
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key_env=None, **FAST)
    bad = RewardInput([{"role": "user", "content": "hi"}], MODEL, REF, metadata={"role_name": "Al"}, key="dlg-7")
    with pytest.raises(ValueError, match="dlg-7.*profile"):
        judge.score([bad])


def test_pickled_judge_works_with_fresh_counters():
    with FakeChatServer(good) as server:
        judge = OpenAIJudge(server.url, "m", api_key_env=None, **FAST)
        judge.score([sample()])
        clone = pickle.loads(pickle.dumps(judge))
        assert clone.stats() == {}
        assert clone.score([sample()])[0] is not None


def test_parse_scores_is_strict():
    text = scores_text(PCOGALIGN_ASPECTS, (1, 2, 3, 4, 5), (10, 9, 8, 7, 6))
    assert parse_scores(text, PCOGALIGN_ASPECTS).a == (1.0, 2.0, 3.0, 4.0, 5.0)
    thinking = "<think>Maybe [Scores]: (3, 3)?</think>\n" + text
    assert parse_scores(thinking, PCOGALIGN_ASPECTS).b == (10.0, 9.0, 8.0, 7.0, 6.0)
    bold = text.replace("[Scores]:", "**[Scores]:**")
    assert parse_scores(bold, PCOGALIGN_ASPECTS) is not None
    assert parse_scores(text, MMROLE_ASPECTS) is None  # 5 pairs for 8 aspects
    assert parse_scores(text.replace("(1, 10)", "(0, 10)"), PCOGALIGN_ASPECTS) is None
    assert parse_scores("", PCOGALIGN_ASPECTS) is None
