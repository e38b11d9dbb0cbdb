"""The API teacher: completions from an OpenAI-compatible server (a hosted model, or vLLM / SGLang on the
user's own cluster), with a budget that holds, the server's rate limits, retries, a response cache and
per-sample resume.

    teacher = ApiTeacher(cfg.teacher.api, journal_dir=stage_dir / "api-samples", cache_dir=...)
    rows = teacher.generate(prompts, decoding, seed)      # the Teacher interface (interface.py)

One request per sample (n = 1, a seed of its own), through the `openai` client (async, its own retries
off: ours know the budget and the pace). What holds, and how:
- Budget: before a request, its worst case (a bound on the prompt's tokens + max_tokens, at
  teacher.api.price) is reserved; spend is then what the server's `usage` says (the worst case when it
  sends none). A request that the budget cannot cover is not sent: BudgetExceeded, after the requests
  in flight are persisted. Spend never exceeds the budget.
- Pace: requests_per_minute / tokens_per_minute from config until the server's `x-ratelimit-*` headers
  say otherwise (OpenAI's convention: limits per minute; remaining 0 waits for the reset). The first
  request goes alone so the headers are known before the rest start (the seed's tier detection).
- Errors: 429 (honouring Retry-After, which pauses every worker), 5xx, timeouts, dropped connections and
  malformed bodies retry with exponential backoff and full jitter, up to max_retries; then the sample is
  recorded as failed with its reason and the rest goes on. 401/403 stop everything at once
  (ApiAuthError, naming the key's environment variable).
- Resume: each completed sample is written atomically to the stage's journal before it counts, so a
  killed stage resumes without losing, duplicating or re-buying one (only requests in flight at the
  kill, at most max_concurrency, are sent again). The cross-run response cache (teacher.api.cache) has
  the same entries, checksummed: a corrupt one is refetched.
The key is read from the environment variable named by teacher.api.api_key_env and goes nowhere else.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from dist_bench.config import ApiTeacherConfig
from dist_bench.redact import treat_as_secret
from dist_bench.teacher.interface import Completion, Decoding, Prompt

BACKOFF_BASE_S = 0.5  # first retry waits up to this (full jitter), doubling per attempt
BACKOFF_CAP_S = 30.0
PACE_SLACK = 0.1  # how late (in intervals) a request may start and still keep the next on the grid
PER_MESSAGE_TOKENS = 8  # chat-template tokens a message may add, on top of its text's bytes


class BudgetExceeded(RuntimeError):
    """The next request could not be paid for within teacher.api.budget."""


class ApiAuthError(ValueError):
    """The server refused the key (401/403): bad input, not a failure to retry."""


@dataclass
class Spend:
    """Money and requests of this stage so far (all attempts: the journal records each sample's cost)."""

    spent: float = 0.0
    reserved: float = 0.0  # worst cases of the requests in flight
    paid_requests: int = 0


def prompt_token_bound(prompt: Prompt, endpoint: str) -> int:
    """At most this many prompt tokens, whatever the server's tokenizer: a byte-level BPE token covers at
    least one byte, and a chat template adds a few tokens per message."""
    if endpoint == "completions" or prompt.text is not None:
        text = prompt.text if prompt.text is not None else json.dumps(prompt.messages)
        return len(text.encode()) + PER_MESSAGE_TOKENS
    return sum(len(str(m.get("content", "")).encode()) + PER_MESSAGE_TOKENS for m in prompt.messages)


def worst_case_cost(cfg: ApiTeacherConfig, prompt_tokens: int, max_tokens: int) -> float:
    return (prompt_tokens * cfg.price.input_per_million + max_tokens * cfg.price.output_per_million) / 1e6


class SampleStore:
    """One JSON file per sample, written atomically, with a checksum over its content."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if entry["checksum"] == _checksum(entry["sample"]):
                return entry["sample"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            pass
        path.unlink(missing_ok=True)  # corrupt: fetched again
        return None

    def put(self, key: str, sample: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"sample": sample, "checksum": _checksum(sample)}), encoding="utf-8")
        os.replace(tmp, path)

    def total_paid(self) -> tuple[float, int]:
        """What the samples in this store cost when they were fetched, and how many were paid for."""
        spent, paid = 0.0, 0
        for path in self.root.glob("*/*.json"):
            sample = self.get(path.stem)
            if sample is not None and sample.get("paid", 0.0) > 0:
                spent, paid = spent + sample["paid"], paid + 1
        return spent, paid


def _checksum(sample: dict) -> str:
    return hashlib.sha256(json.dumps(sample, sort_keys=True).encode()).hexdigest()


class Pacer:
    """Spaces requests (and tokens) to the rate limits: the config's until the server announces its own."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self.request_interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.tokens_per_second = tokens_per_minute / 60.0 if tokens_per_minute else None
        self.next_request_at = 0.0
        self.last_start = 0.0
        self.tokens_free_at = 0.0
        self.paused_until = 0.0
        self.lock = asyncio.Lock()

    async def wait(self, tokens: int) -> None:
        async with self.lock:
            now = time.monotonic()
            # Slots on a grid, not after each actual start: a request that woke a little late (up to a
            # tenth of an interval: a busy host) does not push every later one back; a longer gap (idle,
            # the first request) starts the grid afresh, so no burst follows it
            slot = max(
                now - PACE_SLACK * self.request_interval,
                self.next_request_at,
                self.tokens_free_at,
                self.paused_until,
            )
            start = max(now, slot)
            self.last_start = start
            self.next_request_at = slot + self.request_interval
            if self.tokens_per_second:
                self.tokens_free_at = max(slot, self.tokens_free_at) + tokens / self.tokens_per_second
        await asyncio.sleep(start - now)

    def pause(self, seconds: float) -> None:
        """A 429 with Retry-After, or no requests or tokens left: nobody sends before then."""
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def read_headers(self, headers: Any) -> None:
        limit = _number(headers.get("x-ratelimit-limit-requests"))
        if limit:  # requests per minute (OpenAI's convention), spread evenly
            self.request_interval = 60.0 / limit
            self.next_request_at = max(self.next_request_at, self.last_start + self.request_interval)
        limit = _number(headers.get("x-ratelimit-limit-tokens"))
        if limit:
            self.tokens_per_second = limit / 60.0
        for kind in ("requests", "tokens"):
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            reset = _duration(headers.get(f"x-ratelimit-reset-{kind}"))
            if remaining is not None and remaining < 1 and reset:
                self.pause(reset)


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


_DURATION = re.compile(
    r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$"
)


def _duration(value: str | None) -> float | None:
    """OpenAI's reset format ("1s", "6m0s", "20ms", "1h2m3.5s") or plain seconds, in seconds."""
    if not value:
        return None
    plain = _number(value)
    if plain is not None:
        return plain
    match = _DURATION.match(value.strip())
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds, millis = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    millis = _number(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = headers.get("retry-after")
    seconds = _number(value)
    if seconds is not None or not value:
        return seconds
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class ApiTeacher:
    def __init__(self, cfg: ApiTeacherConfig, journal_dir: Path, cache_dir: Path | None) -> None:
        self.cfg = cfg
        if cfg.api_key_env:  # whatever it is called, its value is masked in every message and tag
            treat_as_secret(cfg.api_key_env)
        self.journal = SampleStore(journal_dir)
        self.cache = SampleStore(cache_dir) if cfg.cache and cache_dir is not None else None
        spent, paid = self.journal.total_paid()  # earlier attempts of this stage count against the budget
        self.spend = Spend(spent=spent, paid_requests=paid)
        self.pacer = Pacer(cfg.requests_per_minute, cfg.tokens_per_minute)  # one pace across all shards
        self.failures: list[dict[str, Any]] = []

    def identity(self) -> dict[str, str]:
        return {
            "model": self.cfg.model,
            "base_url": self.cfg.base_url,
            "backend": f"openai-api.{self.cfg.endpoint}",
        }

    def request(
        self, prompt: Prompt, sample: int, decoding: Decoding, seed: int
    ) -> tuple[str, dict[str, Any]]:
        """A sample's request body, and its key: a hash of the server, the body (model, messages, decoding,
        the sample's own seed) and the sample index, which is what identifies its answer."""
        body = self._body(prompt, decoding, self._sample_seed(prompt, sample, seed))
        material = {
            "base_url": self.cfg.base_url,
            "endpoint": self.cfg.endpoint,
            "body": body,
            "sample": sample,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest(), body

    def generate(self, prompts: list[Prompt], decoding: Decoding, seed: int) -> list[list[Completion]]:
        return asyncio.run(self._generate(prompts, decoding, seed))

    # ---- the requests --------------------------------------------------------------------------------

    async def _generate(self, prompts: list[Prompt], decoding: Decoding, seed: int) -> list[list[Completion]]:
        from openai import AsyncOpenAI

        key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        client = AsyncOpenAI(
            base_url=self.cfg.base_url, api_key=key or "none", max_retries=0, timeout=self.cfg.timeout_s
        )
        pacer = self.pacer
        pacer.lock = asyncio.Lock()  # a lock belongs to one event loop: each shard runs its own
        results: dict[tuple[int, int], Completion] = {}
        todo = []
        for prompt in prompts:
            for sample in range(decoding.n):
                key, body = self.request(prompt, sample, decoding, seed)
                done = self._stored(key)
                if done is not None:
                    results[(prompt.id, sample)] = _completion(done)
                else:
                    todo.append((prompt, sample, key, body))
        stop = asyncio.Event()  # set by the first BudgetExceeded or ApiAuthError: nothing new starts
        errors: list[BaseException] = []
        queue: asyncio.Queue = asyncio.Queue()

        async def run_one(prompt: Prompt, sample: int, key: str, body: dict[str, Any]) -> None:
            try:
                results[(prompt.id, sample)] = await self._fetch(
                    client, pacer, prompt, sample, key, body, decoding.max_new_tokens
                )
            except (BudgetExceeded, ApiAuthError) as err:
                errors.append(err)
                stop.set()

        async def worker() -> None:
            while not stop.is_set() and not queue.empty():
                await run_one(*queue.get_nowait())

        try:
            if todo:
                await run_one(*todo[0])  # alone: its rate-limit headers set the pace for the rest
                for item in todo[1:]:
                    queue.put_nowait(item)
                await asyncio.gather(*(worker() for _ in range(self.cfg.max_concurrency)))
        finally:
            await client.close()
        if errors:
            raise errors[0]
        return [[results[(p.id, s)] for s in range(decoding.n)] for p in prompts]

    def _stored(self, key: str) -> dict | None:
        sample = self.journal.get(key)
        if sample is None and self.cache is not None:
            sample = self.cache.get(key)
            if sample is not None:  # bought by an earlier run: costs this stage nothing
                self.journal.put(key, {**sample, "paid": 0.0, "from_cache": True})
        return sample

    async def _fetch(
        self,
        client: Any,
        pacer: Pacer,
        prompt: Prompt,
        sample: int,
        key: str,
        body: dict[str, Any],
        max_tokens: int,
    ) -> Completion:
        bound = prompt_token_bound(prompt, self.cfg.endpoint)
        worst = worst_case_cost(self.cfg, bound, max_tokens)
        self._reserve(worst)
        try:
            delay, reason = 0.0, ""
            for attempt in range(self.cfg.max_retries + 1):
                await asyncio.sleep(delay)
                await pacer.wait(bound + max_tokens)
                outcome = await self._attempt(client, pacer, body)
                if isinstance(outcome, dict):
                    paid = self._settle(worst, outcome["usage"], bound, max_tokens)
                    stored = {**outcome, "paid": paid, "key": key}
                    self.journal.put(key, stored)  # persisted before it counts
                    if self.cache is not None:
                        self.cache.put(key, {**stored, "paid": 0.0})
                    return _completion(stored)
                reason, retry, paced = outcome
                if not retry:
                    break
                # Retry-After already paused the pacer; otherwise exponential backoff with full jitter
                delay = 0.0 if paced else random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))
            self.failures.append({"prompt_id": prompt.id, "sample": sample, "reason": reason})
            return Completion("", "error", 0, 0, error=f"{reason} after {attempt + 1} attempts")
        finally:
            self.spend.reserved -= worst

    async def _attempt(self, client: Any, pacer: Pacer, body: dict) -> dict | tuple[str, bool, bool]:
        """One request: the parsed answer, or (why it failed, whether to retry, whether Retry-After paced it)."""
        import openai

        try:
            raw = await self._post(client, body)
        except openai.APIStatusError as err:
            pacer.read_headers(err.response.headers)
            status = err.status_code
            if status in (401, 403):
                raise ApiAuthError(
                    f"teacher.api: {self.cfg.base_url} refused the key in ${self.cfg.api_key_env} ({status})"
                ) from None
            if status == 429:
                wait = retry_after(err.response.headers)
                if wait is not None:
                    pacer.pause(wait)
                return f"http {status}", True, wait is not None
            return f"http {status}", status >= 500 or status == 408, False  # 400, 404, 422: would fail again
        except openai.APITimeoutError:
            return "timeout", True, False
        except openai.APIConnectionError:
            return "connection error", True, False
        pacer.read_headers(raw.headers)
        parsed = _parse(raw.text, self.cfg.endpoint)
        return parsed if parsed is not None else ("malformed response", True, False)

    async def _post(self, client: Any, body: dict) -> Any:
        endpoint = client.chat.completions if self.cfg.endpoint == "chat" else client.completions
        extra = {k: body[k] for k in ("top_k",) if k in body}
        params = {k: v for k, v in body.items() if k != "top_k"}
        return await endpoint.with_raw_response.create(**params, extra_body=extra or None)

    def _reserve(self, worst: float) -> None:
        budget = self.cfg.budget
        if budget is not None and self.spend.spent + self.spend.reserved + worst > budget + 1e-12:
            raise BudgetExceeded(
                f"budget exceeded: spent {self.spend.spent:.4f} of teacher.api.budget {budget:g} in "
                f"{self.spend.paid_requests} paid requests; the next could cost up to {worst:.4f}. Rerun with "
                "a larger budget to continue where this stopped"
            )
        self.spend.reserved += worst

    def _settle(self, worst: float, usage: dict | None, bound: int, max_tokens: int) -> float:
        if usage is None:  # no usage reported: count the worst case, never less than may have been charged
            cost = worst
        else:
            cost = worst_case_cost(self.cfg, int(usage.get("prompt_tokens", bound)), 0) + worst_case_cost(
                self.cfg, 0, int(usage.get("completion_tokens", max_tokens))
            )
        self.spend.spent += cost
        self.spend.paid_requests += 1
        return cost

    def _sample_seed(self, prompt: Prompt, sample: int, seed: int) -> int:
        return (seed * 1_000_003 + prompt.id * 1_009 + sample) % 2**31

    def _body(self, prompt: Prompt, decoding: Decoding, sample_seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "max_tokens": decoding.max_new_tokens,
            "temperature": decoding.temperature,
            "seed": sample_seed,
        }
        if self.cfg.endpoint == "chat":
            body["messages"] = (
                prompt.messages if prompt.text is None else [{"role": "user", "content": prompt.text}]
            )
        else:
            body["prompt"] = prompt.text if prompt.text is not None else json.dumps(prompt.messages)
        if not decoding.greedy and decoding.top_p < 1.0:
            body["top_p"] = decoding.top_p
        if not decoding.greedy and decoding.top_k:
            body["top_k"] = decoding.top_k  # not in OpenAI's API; vLLM and SGLang read it from the body
        if decoding.stop:
            body["stop"] = list(decoding.stop)
        return body


def _parse(text: str, endpoint: str) -> dict | None:
    """A completion response's text, finish reason and usage; None for a body that is not one."""
    try:
        data = json.loads(text)
        choice = data["choices"][0]
        content = choice["message"]["content"] if endpoint == "chat" else choice["text"]
        if not isinstance(content, str):
            return None
        usage = data.get("usage")
        if usage is not None and not isinstance(usage, dict):
            usage = None
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        return {
            "text": content,
            "finish_reason": reason,
            "usage": usage,
            "prompt_tokens": int(usage["prompt_tokens"]) if usage and "prompt_tokens" in usage else 0,
            "completion_tokens": int(usage["completion_tokens"])
            if usage and "completion_tokens" in usage
            else 0,
        }
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _completion(sample: dict) -> Completion:
    return Completion(
        sample["text"], sample["finish_reason"], sample["prompt_tokens"], sample["completion_tokens"]
    )
