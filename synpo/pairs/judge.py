"""LLM judge back ends, strict parsing of their answers, and retries.

A judge answers one question at a time with one JSON object, described by an :class:`AnswerSpec`
(``{"hallucination": 4}``, ``{"consistency": [3, 2, 3]}``). :meth:`AnswerSpec.parse` accepts exactly
that object (optionally inside one Markdown code fence, which chat models add even when told not to):
integers in range, the exact key, nothing else. Anything else is a :class:`MalformedAnswer`.

Back ends:

- :class:`HTTPJudge` — an OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, SGLang,
  llama.cpp server, ...) at temperature 0, over ``httpx`` with a timeout. The API key comes from the
  environment variable named in ``api_key_env`` and never appears in logs, records or errors.
- :class:`LocalJudge` — any ``AutoModelForCausalLM`` + tokenizer with a chat template, greedy. With
  ``constrained=True`` it does not generate free text: it picks the most likely of the valid answers
  (log-likelihood of each complete JSON answer), so even a small model always yields a parseable score.

:func:`call_with_retries` retries timeouts, connection errors, HTTP 429/5xx and malformed answers with
exponential backoff (honouring ``Retry-After``) and returns a failure with its reason when attempts run
out. HTTP 401/403/404 raise :class:`JudgeConfigError`: every later call would fail the same way.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


class JudgeCallError(Exception):
    """One judge call failed. ``retryable``: another attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class MalformedAnswer(JudgeCallError):
    """The judge answered, but not with the required JSON object."""

    def __init__(self, message: str):
        super().__init__(message, retryable=True)


class JudgeConfigError(RuntimeError):
    """The judge cannot work at all (rejected key, wrong URL or model): stop the run."""


_FENCE = re.compile(r"\A```(?:json)?[ \t]*\n(?P<body>.*?)\n?```\Z", re.DOTALL | re.IGNORECASE)


def _snippet(text: str, limit: int = 160) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass(frozen=True)
class AnswerSpec:
    """The one JSON object a judge must answer: ``{key: int}`` or ``{key: [count ints]}``, in [low, high]."""

    key: str
    low: int
    high: int
    count: int | None = None  # None: a single integer; otherwise a list of exactly `count` integers

    def _check_int(self, value, where: str) -> int:
        # bool is an int subclass in Python and 4.0 is a float: neither is an acceptable score.
        if isinstance(value, bool) or not isinstance(value, int):
            raise MalformedAnswer(f"{where} must be an integer, got {json.dumps(value)}")
        if not self.low <= value <= self.high:
            raise MalformedAnswer(f"{where} must be in [{self.low}, {self.high}], got {value}")
        return value

    def parse(self, text: str) -> int | list[int]:
        if not isinstance(text, str):
            raise MalformedAnswer(f"answer is not text: {type(text).__name__}")
        body = text.strip()
        fenced = _FENCE.match(body)
        if fenced:
            body = fenced.group("body").strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            raise MalformedAnswer(f"answer is not a single JSON object: {_snippet(text)}") from None
        if not isinstance(obj, dict):
            raise MalformedAnswer(f"answer is not a JSON object: {_snippet(text)}")
        if set(obj) != {self.key}:
            raise MalformedAnswer(f"answer must have exactly the key {self.key!r}, got keys {sorted(obj)}")
        value = obj[self.key]
        if self.count is None:
            return self._check_int(value, self.key)
        if not isinstance(value, list) or len(value) != self.count:
            got = f"{len(value)} items" if isinstance(value, list) else type(value).__name__
            raise MalformedAnswer(f"{self.key} must be a list of {self.count} integers, got {got}")
        return [self._check_int(v, f"{self.key}[{i}]") for i, v in enumerate(value)]

    def render(self, value: int | list[int]) -> str:
        return json.dumps({self.key: value})


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` extra attempts after the first; delays ``backoff * 2**k`` (jittered), capped."""

    max_retries: int = 4
    backoff: float = 1.0
    backoff_max: float = 30.0

    def __post_init__(self):
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {self.max_retries!r}")
        if self.backoff < 0 or self.backoff_max < 0:
            raise ValueError(f"backoff and backoff_max must be >= 0, got {self.backoff}, {self.backoff_max}")

    def delay(self, retry_number: int, retry_after: float | None = None) -> float:
        # Jitter spreads the retries of concurrent calls that failed together (a 429 burst).
        delay = self.backoff * 2 ** (retry_number - 1) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.backoff_max)


@dataclass
class CallResult:
    value: int | list[int] | None
    error: str | None
    attempts: int

    @property
    def ok(self) -> bool:
        return self.error is None


def call_with_retries(
    backend,
    messages: list[dict],
    spec: AnswerSpec,
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] | None = None,
    stop: threading.Event | None = None,
) -> CallResult:
    """Ask until a valid answer or the attempts run out; never raises except :class:`JudgeConfigError`.

    ``stop``: when set (the run is ending), no further attempt starts and backoff waits end early.
    """
    last_error: JudgeCallError | None = None
    attempts = 0
    for attempt in range(1, policy.max_retries + 2):
        if stop is not None and stop.is_set():
            return CallResult(None, "cancelled: the run is stopping", attempts)
        attempts = attempt
        try:
            return CallResult(spec.parse(backend.answer(messages, spec)), None, attempts)
        except MalformedAnswer as exc:
            last_error = exc
            if not backend.retry_malformed:
                break
        except JudgeCallError as exc:
            last_error = exc
            if not exc.retryable:
                break
        if attempt <= policy.max_retries:
            delay = policy.delay(attempt, last_error.retry_after)
            if sleep is not None:
                sleep(delay)
            elif stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
    kind = "malformed answer" if isinstance(last_error, MalformedAnswer) else "call failed"
    plural = "s" if attempts > 1 else ""
    return CallResult(None, f"{kind}: {last_error} (after {attempts} attempt{plural})", attempts)


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare for APIs; the computed backoff applies


class HTTPJudge:
    """An OpenAI-compatible chat-completions endpoint at temperature 0.

    ``base_url``: the API root (``https://api.openai.com/v1``, ``http://localhost:8000/v1``); a URL that
    already ends in ``/chat/completions`` is accepted too. The key is read once from ``api_key_env``
    (no key: no Authorization header, as local servers expect).
    """

    name = "http"
    retry_malformed = True  # temperature-0 API answers are not bit-deterministic; a retry can help

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_tokens: int = 256,
        max_concurrency: int = 8,
        json_mode: bool = False,
        transport=None,
    ):
        import httpx

        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge_url must be an http(s) URL, got {base_url!r}")
        if not model:
            raise ValueError("judge_model must name the model the endpoint serves")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive int, got {max_concurrency!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        url = base_url.rstrip("/")
        if url.endswith("/chat/completions"):
            url = url[: -len("/chat/completions")]
        self.base_url = url
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.max_concurrency = max_concurrency
        self.json_mode = json_mode
        self._key = os.environ.get(api_key_env) if api_key_env else None
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._client = httpx.Client(
            base_url=url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            transport=transport,
        )
        self._httpx = httpx

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model, "url": self.base_url}

    def answer(self, messages: list[dict], spec: AnswerSpec) -> str:
        httpx = self._httpx
        payload = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        if self.json_mode:
            payload["response_format"] = {"type": "json_object"}
        try:
            response = self._client.post("/chat/completions", json=payload)
        except httpx.TimeoutException:
            raise JudgeCallError(f"timed out after {self.timeout:g} s", retryable=True) from None
        except httpx.RequestError as exc:  # connection, protocol and body-decoding errors
            message = self._redact(f"{type(exc).__name__}: {exc}")
            raise JudgeCallError(f"connection failed: {message}", retryable=True) from None
        status = response.status_code
        if status != 200:
            body = self._redact(response.text[:200])
            if status in (401, 403):
                raise JudgeConfigError(
                    f"judge endpoint {self.base_url} refused the request (HTTP {status}); "
                    f"check the key in ${self.api_key_env}: {body}"
                )
            if status == 404:
                raise JudgeConfigError(
                    f"judge endpoint {self.base_url}/chat/completions or model {self.model!r} not found "
                    f"(HTTP 404): {body}"
                )
            retryable = status == 429 or status >= 500
            retry_after = _retry_after_seconds(response.headers.get("retry-after"))
            raise JudgeCallError(f"HTTP {status}: {body}", retryable=retryable, retry_after=retry_after)
        try:
            data = response.json()
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = _snippet(self._redact(response.text))
            raise JudgeCallError(f"not a chat-completions response: {snippet}", retryable=True) from None
        if not isinstance(content, str):
            raise MalformedAnswer(f"message content is {type(content).__name__}, not text")
        return content

    def close(self) -> None:
        self._client.close()


class LocalJudge:
    """A local causal LM judge, greedy (temperature 0).

    Free-form (default): the model generates up to ``max_new_tokens`` and the text is parsed strictly;
    greedy decoding is deterministic, so a malformed answer is not retried. ``constrained=True``: the
    answer is the most likely valid JSON object, scored by log-likelihood (one batched forward per
    answer field, or per list item).
    """

    name = "local"
    retry_malformed = False
    max_concurrency = 1  # one model, one call at a time

    def __init__(
        self, model, tokenizer, *, max_new_tokens: int = 256, constrained: bool = False, label: str = ""
    ):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("judge tokenizer has no chat template")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.constrained = constrained
        self.label = label or getattr(model.config, "_name_or_path", "") or type(model).__name__

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.label, "constrained": self.constrained}

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    @torch.inference_mode()
    def answer(self, messages: list[dict], spec: AnswerSpec) -> str:
        prompt = self._prompt_ids(messages)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        room = 16 if self.constrained else self.max_new_tokens  # a JSON answer is a few tokens
        if limit is not None and len(prompt) + room > limit:
            # Not retryable: the same prompt will not get shorter. The video is recorded as failed.
            raise JudgeCallError(
                f"prompt of {len(prompt)} tokens + {room} answer tokens exceeds "
                f"the judge's context ({limit})",
                retryable=False,
            )
        if self.constrained:
            return spec.render(self._choose(prompt, spec))
        input_ids = torch.tensor([prompt], device=self._device)
        tokenizer = self.tokenizer
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        return tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)

    def _choose(self, prompt: list[int], spec: AnswerSpec) -> int | list[int]:
        values = range(spec.low, spec.high + 1)
        if spec.count is None:
            options = [spec.render(v) for v in values]
            return spec.low + self._best(prompt, options)
        chosen: list[int] = []
        for position in range(spec.count):
            head = '{"' + spec.key + '": [' + "".join(f"{v}, " for v in chosen)
            tail = "]}" if position == spec.count - 1 else ","
            chosen.append(spec.low + self._best(prompt, [f"{head}{v}{tail}" for v in values]))
        return chosen

    def _best(self, prompt: list[int], options: list[str]) -> int:
        """Index of the option with the highest log-likelihood after ``prompt`` (first on ties)."""
        encoded = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in options]
        width = len(prompt) + max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(options), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            sequence = prompt + ids
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention[row, : len(sequence)] = 1
        logits = self.model(
            input_ids=input_ids.to(self._device), attention_mask=attention.to(self._device)
        ).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        scores = []
        for row, ids in enumerate(encoded):
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(ids), device=log_probs.device)
            targets = torch.tensor(ids, device=log_probs.device)
            scores.append(log_probs[row, positions, targets].sum().item())
        return max(range(len(options)), key=lambda i: (scores[i], -i))

    def close(self) -> None:
        pass
