"""The side-by-side protocol: two models' responses to each instruction, judged twice in both orders.

For instruction i in language L the judge sees (instruction, response of model a as "A", of model b as "B")
and then the same pair with the order swapped. An item is

* a **win** (for a) when the judge prefers a's response in both orders, a **loss** when it prefers b's in both,
* a **tie** when its preference follows the position rather than the response (it flips with the order) or it
  answers "tie" in either order,
* **invalid** when either verdict is missing: unparseable, a timeout, an HTTP or judge error.

The score of a against b in L is ``(wins + 0.5 * ties + 0.5 * invalid) / n`` where n counts *every* item of L:
an invalid item counts as a tie, so a failing judge pulls the score towards 0.5 instead of shrinking the
denominator. ``score_valid = (wins + 0.5 * ties) / (n - invalid)`` is reported next to it with the invalid count
and its reasons, so both readings are on the page.

Judges: any object with ``verdicts(requests) -> list[Verdict]``, or a plain callable
``f(instruction, first, second) -> str`` (its text is parsed like an HTTP judge's answer). Built in:
:class:`CallableJudge`, :class:`TransformersJudge` (next-token logits of the two labels) and :class:`HTTPJudge`
(an OpenAI-compatible ``/chat/completions`` endpoint, with timeouts, bounded retries and a disk cache).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from .stats import DEFAULT_ALPHA, DEFAULT_BOOTSTRAP, bootstrap_ci, check_ci_args, rng_for, wilson_ci

__all__ = [
    "JUDGE_PROMPT", "JudgeRequest", "Verdict", "parse_verdict", "outcome", "score_outcomes", "side_by_side",
    "CallableJudge", "TransformersJudge", "HTTPJudge",
]

#: The default judge prompt. ``{instruction}``, ``{response_a}`` and ``{response_b}`` are filled in.
JUDGE_PROMPT = (
    "You compare two responses to a user's instruction. Judge which response follows the instruction better: "
    "correct, helpful, complete, and written in the language of the instruction. Do not let the order of the "
    "responses or their length decide.\n\n"
    "[Instruction]\n{instruction}\n\n"
    "[Response A]\n{response_a}\n\n"
    "[Response B]\n{response_b}\n\n"
    "Which response is better? Answer with the single letter A or B."
)

_VERDICTS = ("A", "B", "tie")
OUTCOMES = ("win", "loss", "tie", "invalid")


@dataclass(frozen=True)
class JudgeRequest:
    """One question to a judge: ``first`` is shown as response A, ``second`` as response B."""

    instruction: str
    first: str
    second: str
    lang: str = ""
    item_id: str = ""

    def prompt(self, template: str = JUDGE_PROMPT) -> str:
        return template.format(instruction=self.instruction, response_a=self.first, response_b=self.second)


@dataclass(frozen=True)
class Verdict:
    """A judge's answer: ``choice`` is "A", "B", "tie" or None (invalid, with ``reason``); ``raw`` its text."""

    choice: Optional[str]
    raw: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        if self.choice not in (*_VERDICTS, None):
            raise ValueError(f"Verdict.choice must be one of {_VERDICTS} or None, got {self.choice!r}")


_ANSWER = re.compile(r"^(?:(?:response|answer|verdict|output)\s*[:\-]?\s*)?([AB])$", re.IGNORECASE)
_BRACKETED = re.compile(r"\[\[\s*([AB])\s*\]\]")


def parse_verdict(text: Any) -> Optional[str]:
    """"A", "B" or "tie" from a judge's free-text answer, or None when it is not one of them.

    Accepted: the letter alone (with surrounding quotes, brackets, markdown emphasis or a final full stop),
    ``Response A`` / ``Answer: B``, ``tie``, or exactly one of ``[[A]]`` / ``[[B]]`` somewhere in a longer answer.
    A longer text that merely contains the letter is not a verdict ("A good question..." is not "A").
    """
    if not isinstance(text, str):
        return None
    s = text.strip().strip("*_`'\"()[]{}<>.:!").strip()
    m = _ANSWER.match(s)
    if m:
        return m.group(1).upper()
    if s.lower() == "tie":
        return "tie"
    found = {g.upper() for g in _BRACKETED.findall(text)}
    return found.pop() if len(found) == 1 else None


def outcome(first_order: Optional[str], swapped_order: Optional[str]) -> str:
    """The item's outcome for model a from the verdicts of the two orders.

    ``first_order`` is the verdict with a's response shown as A; ``swapped_order`` with b's shown as A.
    """
    if first_order not in _VERDICTS or swapped_order not in _VERDICTS:
        return "invalid"
    pref1 = {"A": "a", "B": "b", "tie": None}[first_order]
    pref2 = {"A": "b", "B": "a", "tie": None}[swapped_order]
    if pref1 is not None and pref1 == pref2:
        return "win" if pref1 == "a" else "loss"
    return "tie"


def score_outcomes(outcomes: Sequence[str], *, ci: str = "wilson", n_bootstrap: int = DEFAULT_BOOTSTRAP,
                   alpha: float = DEFAULT_ALPHA, rng: Optional[np.random.Generator] = None) -> dict:
    """Counts, score and score_valid (with intervals) of one language's item outcomes.

    ``ci``: ``"wilson"`` (Wilson score interval with ties as half successes; conservative, and not a point at
    0 or 1) or ``"bootstrap"`` (percentile bootstrap over items; needs ``rng``).
    """
    if ci not in ("wilson", "bootstrap"):
        raise ValueError(f"ci must be 'wilson' or 'bootstrap', got {ci!r}")
    check_ci_args(n_bootstrap, alpha)
    bad = [o for o in outcomes if o not in OUTCOMES]
    if bad:
        raise ValueError(f"outcomes must be drawn from {OUTCOMES}, got {bad[0]!r}")
    counts = {k: sum(1 for o in outcomes if o == k) for k in OUTCOMES}
    n = len(outcomes)
    n_valid = n - counts["invalid"]
    points = np.array([{"win": 1.0, "loss": 0.0, "tie": 0.5, "invalid": 0.5}[o] for o in outcomes])
    valid_points = np.array([p for p, o in zip(points, outcomes) if o != "invalid"])

    def interval(values: np.ndarray) -> list[float]:
        if ci == "wilson":
            return list(wilson_ci(float(values.sum()), len(values), alpha=alpha))
        if rng is None:
            raise ValueError("ci='bootstrap' needs rng")
        return list(bootstrap_ci((values,), lambda v: v.mean(1), n_bootstrap=n_bootstrap, alpha=alpha, rng=rng))

    return {
        "n": n, "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"],
        "invalid": counts["invalid"], "n_valid": n_valid,
        "score": float(points.mean()) if n else math.nan, "score_ci": interval(points),
        "score_valid": float(valid_points.mean()) if n_valid else math.nan, "score_valid_ci": interval(valid_points),
    }


# ---------------------------------------------------------------------------------------------------------
# judges


class CallableJudge:
    """A judge from ``f(instruction, first, second) -> str`` ("A", "B", "tie", or text for
    :func:`parse_verdict`). An exception raised by ``f`` makes that verdict invalid (reason ``error: ...``)."""

    def __init__(self, fn: Callable[[str, str, str], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def verdicts(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        out = []
        for r in requests:
            try:
                raw = self.fn(r.instruction, r.first, r.second)
            except Exception as exc:  # a failing judge is reported per item, never aborts the evaluation
                out.append(Verdict(None, "", f"error: {type(exc).__name__}: {exc}"))
                continue
            choice = parse_verdict(raw)
            out.append(Verdict(choice, raw if isinstance(raw, str) else repr(raw),
                               "" if choice else "unparseable"))
        return out


def as_judge(judge) -> Any:
    if hasattr(judge, "verdicts"):
        return judge
    if callable(judge):
        return CallableJudge(judge)
    raise TypeError(f"judge must be a callable or have a verdicts(requests) method, got {type(judge).__name__}")


class TransformersJudge:
    """A local transformers causal LM as judge: the prompt (in the model's chat template when it has one) is
    followed by the generation prompt, and the verdict is whichever of the two label tokens ("A", "B") has
    the larger next-token logit ("tie" if equal, invalid if not finite).

    Args:
        model: a transformers causal LM. tokenizer: its transformers tokenizer; each label must be one token.
        batch_size: prompts per forward pass (left-padded).
    """

    def __init__(self, model, tokenizer, *, template: str = JUDGE_PROMPT, labels: tuple[str, str] = ("A", "B"),
                 batch_size: int = 8) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if len(labels) != 2 or labels[0] == labels[1]:
            raise ValueError(f"labels must be two different strings, got {labels!r}")
        self.model, self.tokenizer, self.template, self.batch_size = model, tokenizer, template, batch_size
        self.label_ids = []
        for label in labels:
            ids = tokenizer.encode(label, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"labels: {label!r} is {len(ids)} tokens in this tokenizer ({ids}); "
                                 "each label must be a single token")
            self.label_ids.append(int(ids[0]))

    def _text(self, r: JudgeRequest) -> str:
        prompt = r.prompt(self.template)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt + "\n"

    def verdicts(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        import torch

        from .generate import left_padded

        out: list[Verdict] = []
        device = next(self.model.parameters()).device
        self.model.eval()
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            ids, attn = left_padded(self.tokenizer, [self._text(r) for r in chunk])
            ids, attn = ids.to(device), attn.to(device)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                try:  # only the last position's logits: (batch, vocab), not (batch, prompt, vocab)
                    result = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=1)
                except TypeError:  # a model without logits_to_keep
                    result = self.model(input_ids=ids, attention_mask=attn, position_ids=pos)
                logits = result.logits[:, -1, :]
            pair = logits[:, self.label_ids].float().cpu()
            for a, b in pair.tolist():
                raw = f"logit(A)={a:.6g} logit(B)={b:.6g}"
                if not (math.isfinite(a) and math.isfinite(b)):
                    out.append(Verdict(None, raw, "non-finite logits"))
                else:
                    out.append(Verdict("A" if a > b else "B" if b > a else "tie", raw))
        return out


class HTTPJudge:
    """An OpenAI-compatible chat-completions endpoint as judge (OpenAI, vLLM, llama.cpp server, TGI, ...).

    Each request is bounded by ``timeout`` seconds and retried up to ``max_retries`` times, waiting
    ``backoff * 2**attempt`` seconds (at most ``max_backoff``), after an HTTP 5xx or 429, a timeout or
    connection error, or a malformed reply (not JSON, no ``choices[0].message.content`` string). Other 4xx
    answers are not retried. A request that still fails is an invalid verdict with its reason. Replies are
    cached on disk under ``cache_dir`` keyed by a SHA-256 of (model, messages, sampling parameters), so a rerun
    sends nothing for what it has seen; failures are not cached. An answer that is not "A"/"B" is a valid
    reply but an invalid verdict ("unparseable"), cached like any reply (temperature 0 would give it again).

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``; ``/chat/completions`` is
            appended. model: the endpoint's model name.
        api_key_env: name of the environment variable holding the API key (sent as a Bearer token). None: no
            key is sent (local servers); a name whose variable is unset raises ValueError.
        concurrency: requests in flight at once (threads).
    Attributes ``requests_sent``, ``cache_hits`` and ``retries`` count what happened, for reports and tests.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: Optional[str] = None, timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0,
                 cache_dir: Optional[str] = None, temperature: float = 0.0, max_tokens: int = 16,
                 template: str = JUDGE_PROMPT, system: Optional[str] = None, concurrency: int = 4,
                 extra_body: Optional[Mapping[str, Any]] = None) -> None:
        if not isinstance(base_url, str) or not re.match(r"^https?://[^/]+", base_url):
            raise ValueError(f"base_url must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the endpoint's model name, got {model!r}")
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise ValueError(f"timeout must be seconds in (0, 3600], got {timeout!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= 20:
            raise ValueError(f"max_retries must be an int in [0, 20], got {max_retries!r}")
        for name, v in (("backoff", backoff), ("max_backoff", max_backoff)):
            if not isinstance(v, (int, float)) or not 0 <= v <= 600:
                raise ValueError(f"{name} must be seconds in [0, 600], got {v!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 256:
            raise ValueError(f"concurrency must be an int in [1, 256], got {concurrency!r}")
        self.api_key = None
        if api_key_env is not None:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ValueError(f"api_key_env: the environment variable {api_key_env!r} is not set "
                                 "(set it, or leave api_key_env out for a server without keys)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.max_retries = model, float(timeout), max_retries
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.params = {"temperature": temperature, "max_tokens": max_tokens, **dict(extra_body or {})}
        self.template, self.system, self.concurrency = template, system, concurrency
        self.requests_sent = 0
        self.cache_hits = 0
        self.retries = 0
        self._count_lock = threading.Lock()  # the counters are bumped from the request threads

    def _count(self, name: str) -> None:
        with self._count_lock:
            setattr(self, name, getattr(self, name) + 1)

    # --- cache ---------------------------------------------------------------------------------------------
    def _key(self, messages: list[dict]) -> str:
        blob = json.dumps({"model": self.model, "messages": messages, "params": self.params}, sort_keys=True,
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Optional[str]:
        return None if self.cache_dir is None else os.path.join(self.cache_dir, key[:2], key + ".json")

    def _cache_get(self, key: str) -> Optional[str]:
        path = self._cache_path(key)
        if path is None or not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                content = json.load(f)["content"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a damaged entry is asked again and rewritten
        return content if isinstance(content, str) else None

    def _cache_put(self, key: str, content: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{id(content)}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"model": self.model, "content": content}, f, ensure_ascii=False)
        os.replace(tmp, path)  # atomic: concurrent writers of one key leave one whole entry

    # --- requests ------------------------------------------------------------------------------------------
    def _messages(self, r: JudgeRequest) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": r.prompt(self.template)}]

    def _post(self, messages: list[dict]) -> tuple[Optional[str], str, bool]:
        """One attempt: (content, reason, retryable)."""
        body = json.dumps({"model": self.model, "messages": messages, **self.params}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self._count("requests_sent")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            return None, f"http {exc.code}", exc.code >= 500 or exc.code == 429
        except (TimeoutError, socket.timeout):
            return None, "timeout", True
        except urllib.error.URLError as exc:
            timed_out = isinstance(exc.reason, (TimeoutError, socket.timeout))
            return None, "timeout" if timed_out else f"connection error: {exc.reason}", True
        except (ConnectionError, OSError) as exc:
            return None, f"connection error: {exc}", True
        try:
            content = json.loads(payload.decode("utf-8"))["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return None, "malformed reply", True
        if not isinstance(content, str):
            return None, "malformed reply", True
        return content, "", False

    def _ask(self, r: JudgeRequest) -> Verdict:
        messages = self._messages(r)
        key = self._key(messages)
        content = self._cache_get(key)
        if content is not None:
            self._count("cache_hits")
        else:
            reason = ""
            for attempt in range(self.max_retries + 1):
                if attempt:
                    self._count("retries")
                    time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
                content, reason, retryable = self._post(messages)
                if content is not None or not retryable:
                    break
            if content is None:
                tries = attempt + 1
                return Verdict(None, "", f"{reason} (after {tries} attempt{'s' if tries > 1 else ''})")
            self._cache_put(key, content)
        choice = parse_verdict(content)
        return Verdict(choice, content, "" if choice else "unparseable")

    def verdicts(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        if self.concurrency == 1 or len(requests) <= 1:
            return [self._ask(r) for r in requests]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._ask, requests))


# ---------------------------------------------------------------------------------------------------------
# the protocol


def _text(x: Any) -> str:
    return x if isinstance(x, str) else ""


def side_by_side(
    items: Sequence[Mapping],
    judge,
    *,
    languages: Optional[Sequence[str]] = None,
    ci: str = "wilson",
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    names: tuple[str, str] = ("a", "b"),
) -> dict:
    """Judge model a against model b on ``items`` in both orders; per-language scores of a.

    Args:
        items: dicts with ``lang``, ``instruction``, ``a`` and ``b`` (the two responses; None or a non-string
            counts as an empty response) and optionally ``id``.
        judge: a callable ``f(instruction, first, second) -> str`` or an object with ``verdicts(requests)``
            (:class:`CallableJudge`, :class:`TransformersJudge`, :class:`HTTPJudge`).
        languages: the languages to report, in order; a language without items is reported with n = 0.
            None: the languages present, in order of first appearance.
        ci: ``"wilson"`` (default) or ``"bootstrap"`` (B = ``n_bootstrap`` resamples of the items, seeded by
            (``seed``, language)); both at level 1 - ``alpha``.
        names: the two models' names, for the result.

    Returns ``{"names", "ci", "alpha", "languages": {lang: counts and scores (see :func:`score_outcomes`),
    "invalid_reasons": {reason: count}, "empty_a", "empty_b"}, "items": [per-item verdicts and outcome]}``.
    """
    check_ci_args(n_bootstrap, alpha)
    if isinstance(items, (str, bytes, Mapping)):
        raise TypeError(f"items must be a sequence of dicts, got {type(items).__name__}")
    judge = as_judge(judge)
    wanted = None if languages is None else set(languages)
    requests: list[JudgeRequest] = []
    clean: list[dict] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TypeError(f"items[{i}] must be a dict, got {type(item).__name__}")
        lang = item.get("lang")
        if not isinstance(lang, str) or not lang:
            raise ValueError(f"items[{i}] must carry a language code in 'lang', got {lang!r}")
        if wanted is not None and lang not in wanted:
            continue  # not asked for: not sent to the judge either
        instruction = item.get("instruction")
        if not isinstance(instruction, str):
            raise ValueError(f"items[{i}]['instruction'] must be a string, got {instruction!r}")
        a, b = _text(item.get("a")), _text(item.get("b"))
        item_id = str(item.get("id", i))
        clean.append({"id": item_id, "lang": lang, "a": a, "b": b})
        requests.append(JudgeRequest(instruction, a, b, lang, item_id))
        requests.append(JudgeRequest(instruction, b, a, lang, item_id))
    verdicts = judge.verdicts(requests)
    if len(verdicts) != len(requests):
        raise ValueError(f"the judge returned {len(verdicts)} verdicts for {len(requests)} requests")

    order = list(dict.fromkeys(languages)) if languages is not None else []
    for c in clean:
        if languages is None and c["lang"] not in order:
            order.append(c["lang"])
    per_item = []
    for k, c in enumerate(clean):
        v1, v2 = verdicts[2 * k], verdicts[2 * k + 1]
        if not isinstance(v1, Verdict) or not isinstance(v2, Verdict):
            raise TypeError(f"judge.verdicts must return Verdict objects, got {type(v1).__name__}")
        reasons = [f"{which}: {v.reason}" for which, v in (("a first", v1), ("b first", v2)) if v.choice is None]
        per_item.append({"id": c["id"], "lang": c["lang"], "a_first": v1.choice, "b_first": v2.choice,
                         "outcome": outcome(v1.choice, v2.choice), "raw": [v1.raw, v2.raw],
                         "invalid_reasons": reasons, "empty_a": not c["a"].strip(), "empty_b": not c["b"].strip()})
    by_lang: dict[str, dict] = {}
    for lang in order:
        mine = [p for p in per_item if p["lang"] == lang]
        res = score_outcomes([p["outcome"] for p in mine], ci=ci, n_bootstrap=n_bootstrap, alpha=alpha,
                             rng=rng_for(seed, lang))
        reasons: dict[str, int] = {}
        for p in mine:
            for r in p["invalid_reasons"]:
                short = r.split(": ", 1)[1]
                reasons[short] = reasons.get(short, 0) + 1
        res["invalid_reasons"] = reasons
        res["empty_a"] = sum(p["empty_a"] for p in mine)
        res["empty_b"] = sum(p["empty_b"] for p in mine)
        by_lang[lang] = res
    return {"names": list(names), "ci": ci, "alpha": alpha, "n_bootstrap": n_bootstrap if ci == "bootstrap" else None,
            "seed": seed, "languages": by_lang,
            "items": per_item}
