"""HTTPJudge against a scripted OpenAI-compatible server on 127.0.0.1: timeouts, 5xx then success, malformed
replies, 4xx, nonsense answers, retries, the disk cache (a rerun sends nothing) and the API key."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
from loopback_judge import completion, serve

from mlmix.eval import judge as J
from mlmix.eval.runner import main

TIMEOUT = 0.3


class Script:
    """What the server does, by instruction; attempts are counted per prompt."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.auth: list[str] = []
        self.total = 0

    def reply(self, handler, body: dict) -> None:
        prompt = body["messages"][-1]["content"]
        m = re.search(r"\[Instruction\]\n(.*?)\n\n\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\n", prompt, re.S)
        instruction, first = m.group(1), m.group(2)
        with self.lock:
            self.total += 1
            n = self.attempts[prompt] = self.attempts.get(prompt, 0) + 1
            self.auth.append(handler.headers.get("Authorization", ""))
        verdict = "A" if "good" in first else "B"
        kind = instruction.split("-")[0]
        if kind == "flaky500" and n <= 2:
            return handler.send(500, b'{"error": "overloaded"}')
        if kind == "always500":
            return handler.send(503, b"unavailable")
        if kind == "unauthorized":
            return handler.send(401, b'{"error": "bad key"}')
        if kind == "slow" and n == 1 or kind == "slowforever":
            time.sleep(TIMEOUT * 3)
        if kind == "malformed" and n == 1:
            return handler.send(200, b"{not json")
        if kind == "malformed" and n == 2:
            return handler.send(200, json.dumps({"id": "x", "choices": []}).encode())
        if kind == "nonsense":
            verdict = "Both responses have their merits."
        if kind == "chatty":
            verdict = f"Response {verdict} is clearly better. Final verdict: [[{verdict}]]"
        handler.send(200, completion(verdict, body["model"]))


@pytest.fixture
def server():
    script = Script()
    with serve(script.reply) as url:
        script.url = url
        yield script


def _items(kinds, langs=("en", "fi")):
    items = []
    for lang in langs:
        for k, kind in enumerate(kinds):
            a, b = ("good answer", "weak") if k % 2 == 0 else ("weak", "good answer")
            items.append({"id": f"{lang}-{kind}", "lang": lang, "instruction": f"{kind}-{lang}", "a": a, "b": b})
    return items


def _judge(server, tmp_path, **kw):
    args = dict(timeout=TIMEOUT, max_retries=3, backoff=0.01, max_backoff=0.05, cache_dir=str(tmp_path / "cache"))
    args.update(kw)
    return J.HTTPJudge(server.url, "judge-model", **args)


KINDS = ["ok", "flaky500", "slow", "malformed", "chatty", "always500", "nonsense", "unauthorized", "slowforever"]
# requests per order: ok 1, flaky500 3, slow 2, malformed 3, chatty 1, always500 4 (1 + 3 retries), nonsense 1
# (a valid reply: not retried), unauthorized 1 (4xx: not retried), slowforever 4 (timeouts)
REQUESTS = {"ok": 1, "flaky500": 3, "slow": 2, "malformed": 3, "chatty": 1, "always500": 4, "nonsense": 1,
            "unauthorized": 1, "slowforever": 4}
FAILING = {"always500", "unauthorized", "slowforever"}


def test_http_judge_retries_timeouts_and_cache(server, tmp_path):
    items = _items(KINDS)
    judge = _judge(server, tmp_path, concurrency=4)
    res = J.side_by_side(items, judge, languages=["en", "fi", "sw"])
    assert server.total == judge.requests_sent == 2 * 2 * sum(REQUESTS.values())
    assert judge.cache_hits == 0
    assert judge.retries == 2 * 2 * sum(REQUESTS[k] - 1 for k in KINDS if k not in ("nonsense", "unauthorized"))
    outcomes = {(p["lang"], p["id"].split("-", 1)[1]): p["outcome"] for p in res["items"]}
    for lang in ("en", "fi"):
        for k, kind in enumerate(KINDS):
            want = "invalid" if kind in FAILING | {"nonsense"} else ("win" if k % 2 == 0 else "loss")
            assert outcomes[lang, kind] == want, (lang, kind)
        r = res["languages"][lang]
        assert r["n"] == len(KINDS) and r["invalid"] == 4 and r["n_valid"] == len(KINDS) - 4
        assert r["wins"] + r["losses"] + r["ties"] + r["invalid"] == r["n"]
        reasons = r["invalid_reasons"]
        assert reasons["unparseable"] == 2
        assert reasons["http 503 (after 4 attempts)"] == 2
        assert reasons["http 401 (after 1 attempt)"] == 2
        assert reasons["timeout (after 4 attempts)"] == 2
    assert res["languages"]["sw"]["n"] == 0

    # rerun with a fresh judge on the same cache: only the failures are asked again
    server.total = 0
    again = _judge(server, tmp_path, concurrency=4)
    res2 = J.side_by_side(items, again, languages=["en", "fi", "sw"])
    assert again.requests_sent == server.total == 2 * 2 * sum(REQUESTS[k] for k in FAILING)
    assert again.cache_hits == 2 * 2 * (len(KINDS) - len(FAILING))
    assert [p["outcome"] for p in res2["items"]] == [p["outcome"] for p in res["items"]]


def test_http_judge_rerun_costs_nothing(server, tmp_path):
    items = _items(["ok", "flaky500", "malformed", "chatty"], langs=("ar", "zh", "he"))
    first = _judge(server, tmp_path, concurrency=1)
    r1 = J.side_by_side(items, first)
    assert first.requests_sent > 0
    server.total = 0
    second = _judge(server, tmp_path)
    r2 = J.side_by_side(items, second)
    assert second.requests_sent == 0 and server.total == 0 and second.cache_hits == 2 * len(items)
    assert r1["languages"] == r2["languages"]
    # a different judge model is a different cache key
    third = _judge(server, tmp_path)
    third.model = "another-judge"
    J.side_by_side(items[:1], third)
    assert third.requests_sent == 2


def test_http_judge_damaged_cache_entry_is_refetched(server, tmp_path):
    items = _items(["ok"], langs=("it",))
    J.side_by_side(items, _judge(server, tmp_path))
    for path in (tmp_path / "cache").rglob("*.json"):
        path.write_text("{truncated")
    again = _judge(server, tmp_path)
    res = J.side_by_side(items, again)
    assert again.requests_sent == 2 and res["languages"]["it"]["wins"] == 1


def test_http_judge_api_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLMIX_TEST_JUDGE_KEY", "s3cret")
    judge = _judge(server, tmp_path, api_key_env="MLMIX_TEST_JUDGE_KEY", cache_dir=None)
    J.side_by_side(_items(["ok"], langs=("cs",)), judge)
    assert server.auth == ["Bearer s3cret"] * 2
    monkeypatch.delenv("MLMIX_TEST_JUDGE_KEY")
    with pytest.raises(ValueError, match="MLMIX_TEST_JUDGE_KEY"):
        _judge(server, tmp_path, api_key_env="MLMIX_TEST_JUDGE_KEY")


def test_http_judge_unreachable_server_is_invalid_not_a_crash(tmp_path):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = J.HTTPJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=TIMEOUT, max_retries=1, backoff=0.0)
    res = J.side_by_side(_items(["ok"], langs=("et",)), judge)
    et = res["languages"]["et"]
    assert et["n"] == 1 and et["invalid"] == 1 and et["score"] == 0.5
    assert all(k.startswith("connection error") for k in et["invalid_reasons"])


@pytest.mark.parametrize("kwargs,match", [
    ({"base_url": "ftp://example.org"}, "base_url"),
    ({"base_url": "http://x", "model": ""}, "model"),
    ({"timeout": 0}, "timeout"),
    ({"max_retries": -1}, "max_retries"),
    ({"backoff": -1}, "backoff"),
    ({"concurrency": 0}, "concurrency"),
])
def test_http_judge_bad_arguments(kwargs, match):
    args = {"base_url": "http://127.0.0.1:9/v1", "model": "m", **kwargs}
    with pytest.raises(ValueError, match=match):
        J.HTTPJudge(args.pop("base_url"), args.pop("model"), **args)


def test_cli_with_http_judge_and_given_responses(server, tmp_path, capsys):
    from mlmix.data import demo_records

    recs = demo_records(split="heldout", langs=["es", "hi"])[:20]
    files = {}
    for name, make in (("tuned", lambda r: "good answer: " + r["response"]), ("base", lambda r: r["response"])):
        files[name] = tmp_path / f"{name}.jsonl"
        with open(files[name], "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps({"id": r["id"], "lang": r["lang"], "response": make(r)}, ensure_ascii=False) + "\n")
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    config = tmp_path / "eval.toml"
    config.write_text(f"""
output = "out"
[data]
source = "eval.jsonl"
[[models]]
name = "tuned"
responses = "tuned.jsonl"
[[models]]
name = "base"
responses = "base.jsonl"
[judge]
kind = "http"
base_url = "{server.url}"
model = "judge-model"
baseline = "base"
timeout = {TIMEOUT}
backoff = 0.01
""", encoding="utf-8")
    assert main([str(config)]) == 0
    out = capsys.readouterr().out
    assert "vs base" in out and "\nes " in out and "\nhi " in out
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    es = doc["judge"]["pairs"]["tuned"]["languages"]["es"]
    assert (es["n"], es["wins"]) == (16, 16)
    assert doc["judge"]["pairs"]["tuned"]["languages"]["hi"]["n"] == 4
    assert doc["fidelity"]["base"]["languages"]["hi"]["share"] == 1.0
    sent = server.total
    assert main([str(config), "-q"]) == 0  # the rerun is answered from the cache
    assert server.total == sent
