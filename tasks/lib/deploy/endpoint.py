"""A served model, asked one probe at a time: OpenAI-style servers and `mlflow models serve`.

    http://127.0.0.1:8000                      OpenAI-style base URL (GET /v1/models answers): completion
                                               probes to /v1/completions, chat probes to /v1/chat/completions
    http://127.0.0.1:8000/v1/completions       completion probes only
    http://127.0.0.1:8000/v1/chat/completions  chat probes only
    http://127.0.0.1:5000[/invocations]        `mlflow models serve` (GET /ping answers): the probes of the
                                               model's task (llm/v1/chat or llm/v1/completions)

Every request is greedy: temperature 0 for OpenAI-style servers; top_k 1 for MLflow's transformers
flavor, which samples by default and refuses temperature 0. Only loopback URLs are accepted: jielong
does not reach the network at run time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from jielong.models.parity import Probe
from jielong.tasks.core.schema import UserError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CHAT, COMPLETIONS = "llm/v1/chat", "llm/v1/completions"
SUFFIXES = {"/invocations": "invocations", "/v1/chat/completions": "chat", "/v1/completions": "completions"}
APIS = ("openai", *SUFFIXES.values())


class EndpointError(UserError):
    """An endpoint that cannot be used at all: shown as one line."""


@dataclass(frozen=True)
class Answer:
    probe: str
    text: str | None  # None: the request failed
    seconds: float
    error: str | None = None


def _get(url: str, timeout: float) -> int | None:
    import requests

    try:
        return requests.get(url, timeout=timeout).status_code
    except requests.RequestException:
        return None


class Endpoint:
    def __init__(self, url: str, invocations_task: str = CHAT, timeout: float = 60.0, model_name: str = "jielong",
                 api: str | None = None):
        """`api` (openai, chat, completions, invocations) as an earlier look found it: given, nothing is
        requested now (a monitor's later runs must measure a stopped server, not refuse to start)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EndpointError(f"{url!r} is not an http(s) URL")
        if parts.hostname not in LOOPBACK:
            raise EndpointError(f"{url}: only loopback endpoints (127.0.0.1, localhost) are checked; jielong reaches "
                                "no network at run time")
        self.timeout, self.model_name, self.invocations_task = timeout, model_name, invocations_task
        self.base = f"{parts.scheme}://{parts.netloc}"
        path = parts.path.rstrip("/")
        if api is None:
            self.kind = self._kind(url, path)
            return
        if api not in APIS:
            raise EndpointError(f"api {api!r} is not one of {', '.join(APIS)}")
        self.kind = api
        self.root = self.base + next((path.removesuffix(s) for s in SUFFIXES if path.endswith(s)), path)

    def _kind(self, url: str, path: str) -> str:
        for suffix, kind in SUFFIXES.items():
            if path.endswith(suffix):
                self.root = self.base + path.removesuffix(suffix)
                if _get(self.base + "/", 5) is None:
                    raise EndpointError(f"cannot reach {url}: nothing answers at {self.base}")
                return kind
        self.root = self.base + path
        if _get(self.root + "/v1/models", 5) == 200:
            return "openai"
        if _get(self.root + "/ping", 5) == 200:
            return "invocations"
        if _get(self.base + "/", 5) is None:
            raise EndpointError(f"cannot reach {url}: nothing answers at {self.base}")
        raise EndpointError(f"{url} answers neither GET /v1/models (OpenAI-style) nor GET /ping (mlflow models serve); "
                            "give the full endpoint URL, e.g. .../v1/completions or .../invocations")

    def answers(self, probe: Probe) -> bool:
        """Whether this endpoint takes the probe's kind."""
        if self.kind == "openai":
            return True
        if self.kind == "invocations":
            return (probe.kind == "chat") == (self.invocations_task == CHAT)
        return (probe.kind == "chat") == (self.kind == "chat")

    def request(self, probe: Probe, max_new_tokens: int) -> tuple[str, dict]:
        chat = probe.kind == "chat"
        body: dict = {"max_tokens": max_new_tokens}
        body.update({"messages": [{"role": "user", "content": probe.prompt}]} if chat else {"prompt": probe.prompt})
        if self.kind == "invocations":
            return self.root + "/invocations", {**body, "top_k": 1}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        return self.root + path, {**body, "model": self.model_name, "temperature": 0}

    def ask(self, probe: Probe, max_new_tokens: int) -> Answer:
        """One request; any failure (refused, timed out, an error status, a malformed body) is an Answer with an error."""
        import requests

        url, body = self.request(probe, max_new_tokens)
        started = time.perf_counter()
        try:
            response = requests.post(url, json=body, timeout=self.timeout)
            if response.status_code >= 400:
                return Answer(probe.id, None, time.perf_counter() - started,
                              f"HTTP {response.status_code}: {error_message(response)}")
            text = answer_text(response.json(), probe.kind == "chat")
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as err:
            return Answer(probe.id, None, time.perf_counter() - started, f"{type(err).__name__}: {str(err)[:200]}")
        return Answer(probe.id, text, time.perf_counter() - started)


def answer_text(payload, chat: bool) -> str:
    """The first choice's text of an OpenAI-style response (MLflow wraps it in a list)."""
    if isinstance(payload, list):
        payload = payload[0]
    if isinstance(payload, dict) and "predictions" in payload:
        return answer_text(payload["predictions"], chat)
    choice = payload["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    if not isinstance(text, str):
        raise TypeError(f"the answer is {type(text).__name__}, not text")
    return text


def error_message(response) -> str:
    """The server's own words for a failed request (MLflow's JSON `message`, else the body's start)."""
    try:
        payload = response.json()
    except ValueError:
        return " ".join(response.text.split())[:200]
    message = payload.get("message") or payload.get("error") if isinstance(payload, dict) else None
    return " ".join(str(message or payload).split())[:200]  # one line
