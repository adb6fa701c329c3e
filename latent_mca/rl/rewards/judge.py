"""An LLM judge over any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, SGLang, hosted APIs).

Standard library only (``urllib`` + ``json`` + ``concurrent.futures``), so no client dependency is needed.
Robustness is part of the contract because RL calls the judge thousands of times: every HTTP attempt has a
timeout; transient failures (timeouts, connection errors, 429, 5xx, 408, garbled bodies) are retried with
exponential back-off and jitter, honouring ``Retry-After``; a circuit breaker stops hammering an endpoint that
keeps failing; and a judgement that cannot be obtained or parsed is returned as None (NaN reward), never 0.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from latent_mca.rl.rewards.base import PairScores, PairwiseJudge, RewardInput
from latent_mca.rl.rewards.prompts import PROMPT_STYLES, MissingMetadataError
from latent_mca.shards import encode_png, image_extension

_SCORE_RE = re.compile(r"\[Scores\]\**\s*:\s*\**\s*\(\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*\)")
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
_MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def parse_scores(text: str, aspects: Sequence[str], low: float = 1.0, high: float = 10.0) -> PairScores | None:
    """Strictly parse a judge reply into per-aspect scores.

    The reply must contain exactly ``len(aspects)`` ``[Scores]: (a, b)`` pairs (in aspect order), each score in
    ``[low, high]``; a ``<think>...</think>`` block (reasoning judges such as Qwen3) is ignored.

    Args:
        text: The judge's reply.
        aspects: The aspect names, in the order the prompt asked for them.
        low: Lowest allowed score.
        high: Highest allowed score.

    Returns:
        The scores, or None if the reply does not follow the format exactly.
    """
    pairs = _SCORE_RE.findall(_THINK_RE.sub("", text))
    if len(pairs) != len(aspects):
        return None
    values = [(float(a), float(b)) for a, b in pairs]
    if any(not (low <= v <= high) for pair in values for v in pair):
        return None
    return PairScores(tuple(aspects), tuple(a for a, _ in values), tuple(b for _, b in values))


def image_data_url(image: Any) -> str:
    """Encode an image for the OpenAI vision message format.

    Args:
        image: A PIL image (sent as PNG), encoded JPEG/PNG/WebP bytes, a file path, or a ready ``data:``/
            ``http(s)://`` URL (passed through).

    Returns:
        A URL for ``{"type": "image_url", "image_url": {"url": ...}}``.

    Raises:
        TypeError: If the image is of none of these kinds.
    """
    if isinstance(image, str) and image.startswith(("data:", "http://", "https://")):
        return image
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if hasattr(image, "save") and callable(image.save):
        image = encode_png(image)
    if not isinstance(image, (bytes, bytearray)):
        raise TypeError(f"cannot send an image of type {type(image).__name__} to the judge")
    mime = _MIME[image_extension(bytes(image))]
    return f"data:{mime};base64,{base64.b64encode(bytes(image)).decode('ascii')}"


class CircuitBreaker:
    """Open after ``threshold`` consecutive failures; stay open for ``cooldown`` seconds.

    After the cool-down, calls are let through again (half-open); one more failure re-opens it at once, a
    success closes it.

    Args:
        threshold: Consecutive failures that open the breaker (0 disables it).
        cooldown: Seconds the breaker stays open.
        clock: Monotonic time source (injectable for tests).
    """

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold, self.cooldown, self.clock = threshold, cooldown, clock
        self._failures = 0
        self._open_until = float("-inf")
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether a call may go out now."""
        with self._lock:
            return self.threshold <= 0 or self.clock() >= self._open_until

    def record(self, ok: bool) -> bool:
        """Record a call's outcome; returns True if this failure opened the breaker."""
        with self._lock:
            if ok:
                self._failures = 0
                return False
            self._failures += 1
            now = self.clock()
            if self.threshold > 0 and self._failures >= self.threshold and now >= self._open_until:
                self._open_until = now + self.cooldown
                return True
            return False


class _CallError(Exception):
    def __init__(self, kind: str, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(kind)
        self.kind, self.retryable, self.retry_after = kind, retryable, retry_after


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asks us to wait (``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP date)."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            continue
        return max(0.0, when.timestamp() - time.time())
    return None


class OpenAIJudge(PairwiseJudge):
    """Pairwise LLM judge (model answer = A, reference = B) over an OpenAI-compatible chat endpoint.

    Args:
        base_url: API root including the version, e.g. ``http://localhost:8000/v1``; requests go to
            ``{base_url}/chat/completions``.
        model: Model name sent in each request.
        prompt_style: ``"mmrole"`` (8 aspects) or ``"pcogalign"`` (5 aspects).
        api_key_env: Environment variable holding the API key (read once, at construction); if unset or
            empty, no ``Authorization`` header is sent (fine for local servers).
        timeout: Seconds per socket operation of one HTTP attempt.
        max_retries: Retries after the first attempt, for transient failures only.
        backoff_base: First back-off delay in seconds; doubles per retry, with +-50% jitter.
        backoff_max: Cap on one back-off delay.
        max_retry_after: Cap on a server-requested ``Retry-After`` wait.
        max_concurrency: Most HTTP requests in flight at once (across all calls of this instance).
        temperature: Sampling temperature (0: the protocol's deterministic judging).
        max_tokens: Reply budget sent to the server, or None to leave the server default.
        show_image: Send the sample's image to the judge (needs a vision-capable judge model).
        swap: ``"none"`` (model always A), ``"random"`` (A/B order drawn per sample) or ``"both"`` (ask in both
            orders and average, removing position bias at twice the cost; fails if either order fails).
        breaker_threshold: Consecutive failed HTTP attempts that open the circuit breaker (0 disables).
        breaker_cooldown: Seconds the breaker stays open; meanwhile judgements return None at once.
        extra_body: Extra JSON fields merged into each request (e.g. vLLM ``chat_template_kwargs``).
        trust_env: Honour ``http_proxy``-style environment variables.
        seed: Seed of the ``"random"`` order draws.
    """

    def __init__(self, base_url: str, model: str, *, prompt_style: Literal["mmrole", "pcogalign"] = "mmrole",
                 api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0, max_retries: int = 3,
                 backoff_base: float = 1.0, backoff_max: float = 30.0, max_retry_after: float = 60.0,
                 max_concurrency: int = 8, temperature: float = 0.0, max_tokens: int | None = None,
                 show_image: bool = False, swap: Literal["none", "random", "both"] = "none",
                 breaker_threshold: int = 10, breaker_cooldown: float = 60.0,
                 extra_body: Mapping[str, Any] | None = None, trust_env: bool = True, seed: int = 0) -> None:
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {sorted(PROMPT_STYLES)}, got {prompt_style!r}")
        if swap not in ("none", "random", "both"):
            raise ValueError(f"swap must be 'none', 'random' or 'both', got {swap!r}")
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("need max_concurrency >= 1, max_retries >= 0 and timeout > 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.prompt_style, self.swap = model, prompt_style, swap
        self.timeout, self.max_retries, self.max_concurrency = timeout, max_retries, max_concurrency
        self.backoff_base, self.backoff_max, self.max_retry_after = backoff_base, backoff_max, max_retry_after
        self.temperature, self.max_tokens, self.show_image = temperature, max_tokens, show_image
        self.extra_body = dict(extra_body or {})
        self.trust_env, self.seed = trust_env, seed
        self.breaker_threshold, self.breaker_cooldown = breaker_threshold, breaker_cooldown
        self._api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self._build, self._aspects = PROMPT_STYLES[prompt_style]
        self._setup_runtime()

    def _setup_runtime(self) -> None:
        """Locks, counters and connections: rebuilt after unpickling (they cannot be pickled)."""
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._rng = random.Random(self.seed)
        self._jitter = random.Random(self.seed + 1)
        self._breaker = CircuitBreaker(self.breaker_threshold, self.breaker_cooldown)
        handlers = [] if self.trust_env else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)
        self._counters: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the configuration only (the runtime state is rebuilt)."""
        runtime = {"_lock", "_slots", "_rng", "_jitter", "_breaker", "_opener", "_counters"}
        return {k: v for k, v in self.__dict__.items() if k not in runtime}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the configuration and rebuild the runtime state."""
        self.__dict__.update(state)
        self._setup_runtime()

    def __repr__(self) -> str:
        """Configuration without the API key."""
        return f"OpenAIJudge(url={self.url!r}, model={self.model!r}, prompt_style={self.prompt_style!r})"

    @property
    def aspects(self) -> tuple[str, ...]:
        """The prompt style's aspects, in output order."""
        return self._aspects

    def stats(self) -> dict[str, float]:
        """Cumulative counters for logging.

        Keys (present once non-zero): ``requests`` (judge requests), ``calls`` (HTTP attempts), ``retries``,
        ``failures/<kind>`` (kind: timeout, connection, http_429, http_5xx, http_4xx, bad_response),
        ``parse_errors``, ``breaker_trips``, ``breaker_rejections``, ``scored`` and ``unscored`` (samples).
        """
        with self._lock:
            return dict(self._counters)

    def _count(self, key: str, n: float = 1) -> None:
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + n

    def score(self, inputs: Sequence[RewardInput]) -> list[PairScores | None]:
        """Judge each completion (A) against its reference (B); None where no valid judgement was obtained.

        Raises:
            ValueError: If a sample lacks the metadata its prompt style needs (names the sample key).
        """
        if not inputs:
            return []
        tasks: list[tuple[int, bool, list[dict[str, Any]]]] = []
        for i, inp in enumerate(inputs):
            for swapped in self._orders():
                tasks.append((i, swapped, self._messages(inp, swapped)))
        workers = min(self.max_concurrency, len(tasks))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
            judged = list(pool.map(lambda t: self._judge_once(t[2], t[1]), tasks))
        per_input: list[list[PairScores | None]] = [[] for _ in inputs]
        for (i, _, _), result in zip(tasks, judged):
            per_input[i].append(result)
        out = [None if any(r is None for r in rs) else PairScores.average(rs) for rs in per_input]
        self._count("scored", sum(r is not None for r in out))
        self._count("unscored", sum(r is None for r in out))
        return out

    def _orders(self) -> tuple[bool, ...]:
        """Whether the reference is shown first, for each request of one sample."""
        if self.swap == "both":
            return (False, True)
        if self.swap == "random":
            return (self._rng.random() < 0.5,)
        return (False,)

    def _messages(self, inp: RewardInput, swapped: bool) -> list[dict[str, Any]]:
        first, second = (inp.reference, inp.completion) if swapped else (inp.completion, inp.reference)
        try:
            messages = self._build(inp.prompt, first, second, inp.metadata)
        except MissingMetadataError as err:
            raise ValueError(f"sample {inp.key!r}: {err}") from err
        if self.show_image and inp.image is not None:
            image = {"type": "image_url", "image_url": {"url": image_data_url(inp.image)}}
            user = messages[-1]
            messages[-1] = {**user, "content": [image, {"type": "text", "text": user["content"]}]}
        return messages

    def _judge_once(self, messages: list[dict[str, Any]], swapped: bool) -> PairScores | None:
        text = self._request(messages)
        if text is None:
            return None
        parsed = parse_scores(text, self._aspects)
        if parsed is None:
            self._count("parse_errors")
            return None
        return parsed.swapped() if swapped else parsed

    def _request(self, messages: list[dict[str, Any]]) -> str | None:
        """One judge request with retries; the reply text, or None on failure."""
        self._count("requests")
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature, **self.extra_body}
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        body = json.dumps(payload).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            if not self._breaker.allow():
                self._count("breaker_rejections")
                return None
            try:
                text = self._post(body)
            except _CallError as err:
                self._count(f"failures/{err.kind}")
                if self._breaker.record(False):
                    self._count("breaker_trips")
                if not err.retryable or attempt == self.max_retries:
                    return None
                self._count("retries")
                time.sleep(self._delay(attempt, err.retry_after))
                continue
            self._breaker.record(True)
            return text
        return None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.backoff_max, self.backoff_base * 2 ** attempt)
        with self._lock:
            backoff *= 0.5 + self._jitter.random()
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_retry_after))
        return backoff

    def _post(self, body: bytes) -> str:
        """One HTTP attempt; returns the reply text or raises :class:`_CallError`."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._slots:
            self._count("calls")
            raw = self._send(request)
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _CallError("bad_response", retryable=True) from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise _CallError("bad_response", retryable=True)
        return content

    def _send(self, request: urllib.request.Request) -> bytes:
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            code, retry_after = err.code, _retry_after(err.headers)
            err.close()
            if code == 429:
                raise _CallError("http_429", True, retry_after) from None
            if code >= 500:
                raise _CallError("http_5xx", True, retry_after) from None
            raise _CallError("http_4xx", code == 408, retry_after) from None
        except urllib.error.URLError as err:
            kind = "timeout" if isinstance(err.reason, (TimeoutError, socket.timeout)) else "connection"
            raise _CallError(kind, True) from None
        except (TimeoutError, socket.timeout):
            raise _CallError("timeout", True) from None
        except (ConnectionError, http.client.HTTPException, OSError):
            raise _CallError("connection", True) from None
