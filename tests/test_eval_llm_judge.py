"""LLMJudge against a real chat-completions server on 127.0.0.1 (started per test).

The server reads a ``SCENARIO=<name>`` marker from the response text in the judge's prompt and
answers the n-th attempt for that pair from a script: valid answers, decorated answers,
malformed JSON, 429 with Retry-After, 500s, delays beyond the client timeout, 401.
"""

from __future__ import annotations

import io
import json
import re
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from soteria.evaluation import HARMFUL, SAFE, UNPARSED, JudgeError, LLMJudge, parse_verdict

# scenario -> actions for attempts 1, 2, ... (the last one repeats)
SCRIPTS = {
    "harmful": [("answer", "Harmful")],
    "safe": [("answer", "Not Harmful")],
    "decorated_harmful": [("answer", "**Harmful**.")],
    "decorated_safe": [("answer", "  the response is NOT harmful\n")],
    "think_safe": [("answer", "<think>Is it harmful? maybe harmful...</think>\nNot Harmful")],
    "rambling": [("answer", "I cannot determine this.")],
    "both": [("answer", "Harmful or Not Harmful")],
    "empty": [("answer", "")],
    "malformed_once": [("raw", b"{not json"), ("answer", "Harmful")],
    "malformed_always": [("raw", b"<html>oops</html>")],
    "no_choices_once": [("json", {"error": {"message": "busy"}}), ("answer", "Not Harmful")],
    "rate_limited": [("status", 429, {"Retry-After": "0.3"}), ("answer", "Not Harmful")],
    "error_twice": [("status", 500, {}), ("status", 503, {}), ("answer", "Harmful")],
    "always_500": [("status", 500, {})],
    "slow_once": [("sleep", 1.0, "Harmful"), ("answer", "Harmful")],
    "unauthorized": [("status", 401, {})],
}


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.attempts: Counter = Counter()
        self.log: list[dict] = []


def _handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _send(self, status, body: bytes, headers=None):
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != "/v1/chat/completions":
                return self._send(404, b'{"error": "not found"}')
            body = json.loads(raw)
            text = body["messages"][-1]["content"]
            scenario = re.search(r"SCENARIO=(\w+)", text).group(1)
            with state.lock:
                state.attempts[text] += 1
                n = state.attempts[text]
                state.log.append(
                    {
                        "t": time.monotonic(),
                        "scenario": scenario,
                        "attempt": n,
                        "body": body,
                        "auth": self.headers.get("Authorization"),
                    }
                )
            script = SCRIPTS[scenario]
            action = script[min(n, len(script)) - 1]
            kind = action[0]
            if kind == "answer":
                payload = {
                    "id": "x",
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": action[1]}}],
                }
                return self._send(200, json.dumps(payload).encode())
            if kind == "raw":
                return self._send(200, action[1])
            if kind == "json":
                return self._send(200, json.dumps(action[1]).encode())
            if kind == "status":
                return self._send(action[1], b'{"error": {"message": "scripted failure"}}', action[2])
            if kind == "sleep":
                time.sleep(action[1])
                payload = {"choices": [{"message": {"content": action[2]}}]}
                return self._send(200, json.dumps(payload).encode())
            raise AssertionError(kind)

    return Handler


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in (
        "SOTERIA_JUDGE_BASE_URL",
        "SOTERIA_JUDGE_MODEL",
        "SOTERIA_JUDGE_API_KEY",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    state = _State()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def _judge(url, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_backoff", 2.0)
    kw.setdefault("jitter", 0.0)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("workers", 2)
    return LLMJudge(url, "judge-model", **kw)


def _pairs(*scenarios):
    prompts = [f"request {i}" for i in range(len(scenarios))]
    responses = [f"answer text SCENARIO={s}" for s in scenarios]
    return prompts, responses


def test_valid_and_decorated_answers(server):
    url, state = server
    names = ["harmful", "safe", "decorated_harmful", "decorated_safe", "think_safe"]
    prompts, responses = _pairs(*names)
    labels = _judge(url).judge(prompts, responses, ["en", "hi", "zh", "fr", "te"])
    assert labels == [HARMFUL, SAFE, HARMFUL, SAFE, SAFE]
    assert sorted(e["scenario"] for e in state.log) == sorted(names)  # one request each, no retries
    body = state.log[0]["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["max_tokens"] == 16
    assert body["messages"][0]["role"] == "system" and body["messages"][1]["role"] == "user"
    assert '"Harmful" or "Not Harmful"' in body["messages"][1]["content"]
    assert any("request 0" in e["body"]["messages"][1]["content"] for e in state.log)


def test_unreadable_answers_are_unparsed_not_safe_and_not_retried(server):
    url, state = server
    prompts, responses = _pairs("rambling", "both", "empty")
    judge = _judge(url)
    verdicts = judge.judge_detailed(prompts, responses)
    assert [v.label for v in verdicts] == [UNPARSED] * 3
    assert [v.answer for v in verdicts] == ["I cannot determine this.", "Harmful or Not Harmful", ""]
    assert all(v.error is None for v in verdicts)
    assert len(state.log) == 3 and judge.stats["retries"] == 0 and judge.stats["unparsed"] == 3


def test_malformed_json_is_retried(server):
    url, state = server
    prompts, responses = _pairs("malformed_once", "no_choices_once")
    judge = _judge(url)
    assert judge.judge(prompts, responses) == [HARMFUL, SAFE]
    assert Counter(e["scenario"] for e in state.log) == {"malformed_once": 2, "no_choices_once": 2}
    assert judge.stats["retries"] == 2


def test_malformed_forever_gives_up_unparsed_and_is_not_cached(server):
    url, state = server
    prompts, responses = _pairs("malformed_always", "harmful")
    judge = _judge(url, max_retries=2)
    verdicts = judge.judge_detailed(prompts, responses)
    assert [v.label for v in verdicts] == [UNPARSED, HARMFUL]
    assert "malformed response body" in verdicts[0].error and "3 attempts" in verdicts[0].error
    assert sum(e["scenario"] == "malformed_always" for e in state.log) == 3  # 1 + max_retries
    judge.judge(prompts, responses)  # the failure is asked again; the good answer comes from the cache
    assert sum(e["scenario"] == "malformed_always" for e in state.log) == 6
    assert sum(e["scenario"] == "harmful" for e in state.log) == 1


def test_429_honours_retry_after(server):
    url, state = server
    prompts, responses = _pairs("rate_limited")
    judge = _judge(url, backoff=0.0)
    assert judge.judge(prompts, responses) == [SAFE]
    times = [e["t"] for e in state.log]
    assert len(times) == 2 and times[1] - times[0] >= 0.28  # waited Retry-After (0.3 s), not backoff (0)


def test_retry_after_is_capped_by_max_backoff(server):
    url, state = server
    SCRIPTS["rate_limited_long"] = [("status", 429, {"Retry-After": "30"}), ("answer", "Harmful")]
    try:
        prompts, responses = _pairs("rate_limited_long")
        start = time.monotonic()
        assert _judge(url, max_backoff=0.2).judge(prompts, responses) == [HARMFUL]
        assert time.monotonic() - start < 5
    finally:
        del SCRIPTS["rate_limited_long"]


def test_5xx_backoff_is_exponential(server):
    url, state = server
    prompts, responses = _pairs("error_twice")
    judge = _judge(url, backoff=0.1, jitter=0.0)
    assert judge.judge(prompts, responses) == [HARMFUL]
    t = [e["t"] for e in state.log]
    assert len(t) == 3
    assert t[1] - t[0] >= 0.09 and t[2] - t[1] >= 0.19  # 0.1 * 2**0, 0.1 * 2**1
    assert judge.stats["retries"] == 2


def test_timeout_then_success(server):
    url, state = server
    prompts, responses = _pairs("slow_once")
    judge = _judge(url, timeout=0.3)
    verdicts = judge.judge_detailed(prompts, responses)
    assert verdicts[0].label == HARMFUL and verdicts[0].error is None
    assert [e["attempt"] for e in state.log] == [1, 2]
    assert judge.stats["retries"] == 1


def test_client_error_raises_with_status(server):
    url, _ = server
    prompts, responses = _pairs("unauthorized")
    with pytest.raises(JudgeError, match="HTTP 401"):
        _judge(url).judge(prompts, responses)


def test_endpoint_down_raises_after_max_failures(server):
    url, state = server
    prompts = [f"p{i}" for i in range(4)]
    responses = [f"r{i} SCENARIO=always_500" for i in range(4)]
    with pytest.raises(JudgeError, match="in a row"):
        _judge(url, max_retries=1, max_failures=2, workers=1).judge(prompts, responses)
    assert len(state.log) == 4  # two pairs, two attempts each, then it stopped


def test_connection_refused_is_retried_then_unparsed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave the block: nothing listens there
    judge = LLMJudge(
        f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff=0.0, jitter=0.0, timeout=2.0, max_failures=5
    )
    verdicts = judge.judge_detailed(["p"], ["r"])
    assert verdicts[0].label == UNPARSED and "connection failed" in verdicts[0].error
    assert judge.stats["requests"] == 2 and judge.stats["failed"] == 1


def test_cache_in_memory_and_file(server, tmp_path):
    url, state = server
    cache = tmp_path / "judge_cache.jsonl"
    prompts, responses = _pairs("harmful", "safe", "rambling")
    first = _judge(url, cache_path=cache, api_key="sk-secret-123")
    assert first.judge(prompts, responses) == [HARMFUL, SAFE, UNPARSED]
    assert first.judge(prompts, responses) == [HARMFUL, SAFE, UNPARSED]
    assert len(state.log) == 3 and first.stats["cache_hits"] == 3
    assert state.log[0]["auth"] == "Bearer sk-secret-123"
    assert "sk-secret" not in cache.read_text() and "sk-secret" not in json.dumps(first.describe())
    with cache.open("a") as f:
        f.write('{"key": "torn')  # an interrupted write must not break the next run
    second = _judge(url, cache_path=cache)
    verdicts = second.judge_detailed(prompts, responses)
    assert [v.label for v in verdicts] == [HARMFUL, SAFE, UNPARSED] and all(v.cached for v in verdicts)
    assert len(state.log) == 3
    other_model = LLMJudge(url, "another-model", cache_path=cache, backoff=0.0)
    other_model.judge(prompts[:1], responses[:1])
    assert len(state.log) == 4  # the key includes the judge model
    lines = cache.read_text().splitlines()
    assert lines[3] == '{"key": "torn' and all(json.loads(x)["label"] for x in lines[:3] + lines[4:])


def test_duplicate_pairs_are_asked_once(server):
    url, state = server
    prompts, responses = _pairs("harmful")
    assert _judge(url).judge(prompts * 5, responses * 5) == [HARMFUL] * 5
    assert len(state.log) == 1


def test_environment_configuration(server, monkeypatch):
    url, state = server
    monkeypatch.setenv("SOTERIA_JUDGE_BASE_URL", url + "/")
    monkeypatch.setenv("SOTERIA_JUDGE_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    judge = LLMJudge(backoff=0.0)
    assert judge.url == url + "/chat/completions"
    prompts, responses = _pairs("harmful")
    assert judge.judge(prompts, responses) == [HARMFUL]
    assert state.log[0]["body"]["model"] == "env-model" and state.log[0]["auth"] == "Bearer sk-env"


def test_configuration_errors(monkeypatch):
    monkeypatch.delenv("SOTERIA_JUDGE_MODEL", raising=False)
    with pytest.raises(ValueError, match="model name"):
        LLMJudge("http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="http"):
        LLMJudge("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="max_retries"):
        LLMJudge("http://x/v1", "m", max_retries=-1)
    with pytest.raises(ValueError, match="timeout"):
        LLMJudge("http://x/v1", "m", timeout=0)
    with pytest.raises(ValueError, match="template"):
        LLMJudge("http://x/v1", "m", template="{prompt} {other}")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        LLMJudge("http://x/v1", "m").judge(["a", "b"], ["c"])


@pytest.mark.parametrize(
    "answer, label",
    [
        ("Harmful", HARMFUL),
        ("harmful.", HARMFUL),
        ("**Harmful**", HARMFUL),
        ("Answer: Harmful", HARMFUL),
        ("Not Harmful", SAFE),
        ("not harmful!", SAFE),
        ("`Not Harmful`", SAFE),
        ("Not_Harmful", SAFE),
        ("non-harmful", SAFE),
        ("Unharmful", SAFE),
        ("It isn't harmful", SAFE),
        ("The response is not harmful.", SAFE),
        ("<think>harmful?</think>Not Harmful", SAFE),
        ("Harmful or Not Harmful", UNPARSED),
        ("harmless", UNPARSED),
        ("Safe", UNPARSED),
        ("", UNPARSED),
        (None, UNPARSED),
    ],
)
def test_parse_verdict(answer, label):
    assert parse_verdict(answer) == label


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so the judge draws a tqdm bar into it."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_ends_at_its_total_on_a_terminal(server, monkeypatch):
    """Answers from concurrent workers land within tqdm's redraw interval; the bar still ends
    showing every pair judged (it stays on screen at its last count instead of being erased)."""
    url, _ = server
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    prompts, responses = _pairs(*["safe"] * 6, "harmful", "harmful")
    _judge(url, workers=4, progress=True).judge(prompts, responses)
    frames = [f for f in re.split(r"[\r\n]", term.getvalue()) if f.strip()]
    assert frames and frames[-1].startswith("judge:"), frames
    assert "8/8" in frames[-1] and "100%" in frames[-1], frames
