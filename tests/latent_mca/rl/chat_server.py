"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol, scripted per test."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    """What the server answers to one request."""

    content: str | None = None  # chat message content of a 200 reply
    status: int = 200
    body: bytes | None = None  # raw body, overrides `content`
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    payload: dict[str, Any]
    arrived: float


def user_text(payload: dict[str, Any]) -> str:
    """The text of the last user message (content string or the text parts of a content list)."""
    content = payload["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def scores_text(aspects, a_scores, b_scores) -> str:
    """A well-formed judge reply."""
    rows = zip(aspects, a_scores, b_scores)
    return "\n".join(f"{name}: a short reason. [Scores]: ({a}, {b})" for name, a, b in rows)


class FakeChatServer:
    """Scripted chat-completions server; `behaviour(payload, index) -> Reply` decides each answer.

    Records every request, and the largest number of requests that were in flight at the same time.
    """

    def __init__(self, behaviour: Callable[[dict[str, Any], int], Reply]) -> None:
        self.behaviour = behaviour
        self.received: list[Received] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payload = json.loads(raw)
                with outer._lock:
                    index = len(outer.received)
                    outer.received.append(Received(self.path, dict(self.headers), payload, time.monotonic()))
                    outer.active += 1
                    outer.max_active = max(outer.max_active, outer.active)
                try:
                    reply = outer.behaviour(payload, index)
                    if reply.delay:
                        outer._stop.wait(reply.delay)
                    body = reply.body
                    if body is None:
                        choice = {"index": 0, "message": {"role": "assistant", "content": reply.content},
                                  "finish_reason": "stop"}
                        body = json.dumps({"id": f"r{index}", "object": "chat.completion",
                                           "choices": [choice]}).encode()
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass
                finally:
                    with outer._lock:
                        outer.active -= 1

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        serve = dict(poll_interval=0.02)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs=serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
