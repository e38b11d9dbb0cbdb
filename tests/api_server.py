"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests of API clients (no mocked transport).

Serves ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` with deterministic
answers, injectable faults (429 with Retry-After, 500, slow "timeout" answers, malformed JSON), OpenAI-style
``x-ratelimit-*`` headers with enforcement, and a request log (``ApiServer.log``) tests can inspect.

Answer: ``words_per_answer`` words ``w<k>`` (k in 0..99) joined by single spaces with a leading space.
The words come from sha256 of the request content (model, messages or prompt, seed, temperature, top_p;
not max_tokens, so a truncated answer is a prefix of the full one). If max_tokens < words_per_answer the
first max_tokens words are returned with finish_reason "length", otherwise all words with "stop".
``stop`` is accepted and ignored. ``Behaviour.answer`` may script the text instead (a judge's verdicts).

Token counting rule (so tests can compute exact usage): a token is a whitespace-separated word.
  chat:        prompt_tokens = words over all message contents + 4 per message
  completions: prompt_tokens = words in the prompt
  completion_tokens = number of answer words returned; total_tokens = prompt_tokens + completion_tokens

Rate limits: continuously refilled buckets at limit/60 per second holding one second's worth (at least 1).
A request costs 1 request and prompt_tokens + max_tokens tokens (words_per_answer when max_tokens is
absent). A request dearer than the whole token bucket is admitted once the bucket is full and leaves it
in debt, so it is delayed rather than refused forever and the long-run rate still holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MODEL_ID = "teacher-model"
MALFORMED = '{"id": "chatcmpl-x", "choices": ['


@dataclass
class Behaviour:
    api_key: str = "sk-test-key"  # "Authorization: Bearer <api_key>" or 401
    failure_rate: float = 0.0  # share of completion requests answered with a fault
    failures: tuple[str, ...] = ("429", "500", "timeout", "malformed")  # fault kinds, used in rotation
    retry_after_s: float = 0.2  # Retry-After of injected 429s
    timeout_sleep_s: float = 5.0  # a "timeout" fault answers normally after this long
    seed: int = 0  # fault draws are deterministic given the seed and request order
    requests_per_minute: int | None = None  # set: x-ratelimit-*-requests headers, enforced
    tokens_per_minute: int | None = None  # set: x-ratelimit-*-tokens headers, enforced
    words_per_answer: int = 12  # answer length before max_tokens truncation
    send_usage: bool = True  # include "usage" in answers
    # set: the answer's text for a request body (a judge's verdicts, say), or None for the default words;
    # max_tokens still cuts it (words) and usage counts its words
    answer: Callable[[dict], str | None] | None = None


@dataclass
class LoggedRequest:
    time: float
    path: str
    status: int
    fault: str | None
    key: str | None
    body: dict | None


def _error(status: int, message: str, type_: str, code: str | None, headers: dict | None = None) -> Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "0.5s", "1s", "6m0s"."""
    minutes, secs = divmod(round(seconds, 3), 60)
    text = (f"{secs:.3f}".rstrip("0").rstrip(".") or "0") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class _Bucket:
    """Continuously replenishing bucket holding one second's worth, as OpenAI's limiter behaves."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.limit = per_minute
        self.rate = per_minute / 60
        self.capacity = max(1.0, self.rate)
        self.available = self.capacity
        self.last = now

    def refill(self, now: float) -> None:
        self.available = min(self.capacity, self.available + (now - self.last) * self.rate)
        self.last = now

    def wait(self, cost: float) -> float:
        missing = min(cost, self.capacity) - self.available
        return missing / self.rate if missing > 1e-9 else 0.0  # tolerance: float drift must not refuse

    def headers(self, kind: str) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{kind}": str(self.limit),
            f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(self.available + 1e-9))),
            f"x-ratelimit-reset-{kind}": _duration(max(0.0, self.capacity - self.available) / self.rate),
        }


class ApiServer:
    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.base_url = ""
        self.log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._rng_seed: int | None = None
        self._rng = random.Random()
        self._faults_drawn = 0
        self._buckets: dict[str, _Bucket] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.app = Starlette(
            routes=[
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/chat/completions", self._complete, methods=["POST"]),
                Route("/v1/completions", self._complete, methods=["POST"]),
            ]
        )

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> ApiServer:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._server.run, name="api-test-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("API test server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._stopping.set()
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers ----------------------------------------------------------------------------------------
    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.behaviour.api_key}"

    def _unauthorized(self) -> Response:
        return _error(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key")

    async def _models(self, request: Request) -> Response:
        arrival = time.monotonic()
        ok = self._authorized(request)
        self._record(LoggedRequest(arrival, request.url.path, 200 if ok else 401, None, None, None))
        if not ok:
            return self._unauthorized()
        model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "test"}
        return JSONResponse({"object": "list", "data": [model]})

    async def _complete(self, request: Request) -> Response:
        arrival = time.monotonic()
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        # Everything below up to the log append is synchronous, so the log keeps arrival order.
        response, fault, key, delay = self._answer(request, body)
        entry = LoggedRequest(arrival, request.url.path, response.status_code, fault, key, body)
        self._record(entry)
        deadline = arrival + delay
        # Async sleep so a slow answer holds up no other request; cut short by stop() for a quick, quiet exit.
        while time.monotonic() < deadline and not self._stopping.is_set():
            await asyncio.sleep(min(0.05, deadline - time.monotonic()))
        return response

    def _answer(self, request: Request, body: Any) -> tuple[Response, str | None, str | None, float]:
        b, chat = self.behaviour, request.url.path.endswith("/chat/completions")
        if not self._authorized(request):
            return self._unauthorized(), None, None, 0.0
        field = "messages" if chat else "prompt"
        valid = isinstance(body, dict) and (
            isinstance(body.get("messages"), list) and all(isinstance(m, dict) for m in body["messages"])
            if chat
            else isinstance(body.get("prompt"), str)
        )
        if not valid:
            return _error(400, f"'{field}' is required", "invalid_request_error", None), None, None, 0.0
        if body.get("n", 1) != 1:
            return _error(400, "only n=1 is supported", "invalid_request_error", None), None, None, 0.0

        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        content = {f: body.get(f) for f in ("model", field, "seed", "temperature", "top_p")}
        key = _sha({**content, "max_tokens": max_tokens})
        if chat:
            prompt_tokens = sum(len(_text(m.get("content")).split()) + 4 for m in body["messages"])
        else:
            prompt_tokens = len(body["prompt"].split())

        cost = prompt_tokens + (max_tokens if isinstance(max_tokens, int) else b.words_per_answer)
        wait, headers = self._take(cost)
        if wait:
            retry = math.ceil(wait * 1000) / 1000  # round up so a client that obeys it is admitted
            headers |= {"Retry-After": str(retry), "retry-after-ms": str(math.ceil(retry * 1000))}
            msg = "Rate limit reached; please try again later."
            return _error(429, msg, "requests", "rate_limit_exceeded", headers), "rate_limited", key, 0.0

        fault = self._draw_fault()
        if fault == "429":
            headers["Retry-After"] = str(float(b.retry_after_s))
            msg = "Rate limit reached (injected fault)."
            return _error(429, msg, "requests", "rate_limit_exceeded", headers), fault, key, 0.0
        if fault == "500":
            msg = "The server had an error while processing your request."
            return _error(500, msg, "server_error", None, headers), fault, key, 0.0
        if fault == "malformed":
            return Response(MALFORMED, media_type="application/json", headers=headers), fault, key, 0.0

        scripted = b.answer(body) if b.answer is not None else None
        if scripted is not None:
            words = scripted.split()
        else:
            words = [f"w{int(_sha([_sha(content), i])[:8], 16) % 100}" for i in range(b.words_per_answer)]
        truncated = isinstance(max_tokens, int) and max_tokens < len(words)
        words = words[: max(0, max_tokens)] if truncated else words
        text = "".join(" " + w for w in words)
        finish = "length" if truncated else "stop"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        out: dict[str, Any] = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model") or MODEL_ID,
            "choices": [choice],
        }
        if b.send_usage:
            n = len(words)
            out["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
            }
        delay = b.timeout_sleep_s if fault == "timeout" else 0.0
        return JSONResponse(out, headers=headers), fault, key, delay

    # -- faults and limits -------------------------------------------------------------------------------
    def _draw_fault(self) -> str | None:
        """Seeded draw per completion request; kinds rotate, so failure_rate=1 shows every kind in turn."""
        b = self.behaviour
        if self._rng_seed != b.seed:  # reseed when a test changes the seed
            self._rng_seed, self._rng, self._faults_drawn = b.seed, random.Random(b.seed), 0
        if self._rng.random() >= b.failure_rate or not b.failures:
            return None
        self._faults_drawn += 1
        return b.failures[(self._faults_drawn - 1) % len(b.failures)]

    def _take(self, tokens: int) -> tuple[float, dict[str, str]]:
        """Charge both buckets, or neither; returns (seconds to wait, 0 if admitted) and the headers."""
        b, now = self.behaviour, time.monotonic()
        active: list[tuple[str, _Bucket, float]] = []
        limits = (("requests", b.requests_per_minute, 1), ("tokens", b.tokens_per_minute, tokens))
        for kind, limit, cost in limits:
            bucket = self._buckets.get(kind)
            if limit is None:
                self._buckets.pop(kind, None)
                continue
            if bucket is None or bucket.limit != limit:  # a changed limit starts a fresh, full bucket
                bucket = self._buckets[kind] = _Bucket(limit, now)
            bucket.refill(now)
            active.append((kind, bucket, cost))
        wait = max((bucket.wait(cost) for _, bucket, cost in active), default=0.0)
        headers: dict[str, str] = {}
        for kind, bucket, cost in active:
            if not wait:
                bucket.available -= cost
            headers |= bucket.headers(kind)
        return wait, headers
