"""mlmix.eval: the side-by-side arithmetic, bootstrap/Wilson intervals, per-language loss against a plain
reference, generation, language fidelity on the 12 study languages, bad input, and the whole thing end to end
on tiny randomly initialised models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlmix  # noqa: E402
from mlmix.data import DEMO_LANGUAGES, demo_records  # noqa: E402
from mlmix.eval import judge as J  # noqa: E402
from mlmix.eval import stats as S  # noqa: E402
from mlmix.eval.fidelity import language_fidelity  # noqa: E402
from mlmix.eval.generate import generate  # noqa: E402
from mlmix.eval.loss import encode_eval_set, example_losses, heldout_loss  # noqa: E402
from mlmix.eval.results import chart, format_table, html_section, to_json  # noqa: E402
from mlmix.eval.runner import evaluate, load_config, main  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ------------------------------------------------------------------------------------------------------------
# fixtures: a small BPE trained on the demo data and tiny Llama models


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # tiny models: thread start-up and spinning cost more than they save on a shared machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mlmix.chat import CHATML_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["instruction"] + "\n" + r["response"] for r in demo_records(split="train")], trainer)
    # the judge's labels must be single tokens
    tok.add_tokens(["A", "B"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def tiny_lm(vocab: int, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                   eos_token_id=2, pad_token_id=0, bos_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model_a(hf_tok):
    return tiny_lm(len(hf_tok), 0)


@pytest.fixture(scope="module")
def model_b(hf_tok):
    return tiny_lm(len(hf_tok), 1)


@pytest.fixture(scope="module")
def heldout():
    return demo_records(split="heldout", langs=["en", "fi", "zh", "sw"])


# ------------------------------------------------------------------------------------------------------------
# the protocol's arithmetic


@pytest.mark.parametrize("first,swapped,expected", [
    ("A", "B", "win"),       # a preferred in both orders
    ("B", "A", "loss"),      # b preferred in both orders
    ("A", "A", "tie"),       # the judge follows the position: preference flips with the order
    ("B", "B", "tie"),
    ("tie", "B", "tie"),
    ("A", "tie", "tie"),
    ("tie", "tie", "tie"),
    (None, "B", "invalid"),
    ("A", None, "invalid"),
    (None, None, "invalid"),
])
def test_outcome_table(first, swapped, expected):
    assert J.outcome(first, swapped) == expected


def test_score_all_win_all_loss_and_mixed():
    win = J.score_outcomes(["win"] * 16)
    assert (win["wins"], win["losses"], win["ties"], win["invalid"], win["n"]) == (16, 0, 0, 0, 16)
    assert win["score"] == 1.0 and win["score_ci"][1] == 1.0
    z = 1.959963984540054
    assert win["score_ci"][0] == pytest.approx(16 / (16 + z * z), abs=1e-9)  # Wilson lower bound at p = 1
    loss = J.score_outcomes(["loss"] * 16)
    assert loss["score"] == 0.0 and loss["score_ci"][0] == 0.0
    assert loss["score_ci"][1] == pytest.approx(1 - 16 / (16 + z * z), abs=1e-9)

    mixed = ["win"] * 5 + ["loss"] * 3 + ["tie"] * 2 + ["invalid"] * 2
    r = J.score_outcomes(mixed)
    assert (r["wins"], r["losses"], r["ties"], r["invalid"], r["n"], r["n_valid"]) == (5, 3, 2, 2, 12, 10)
    assert r["score"] == pytest.approx((5 + 0.5 * 2 + 0.5 * 2) / 12)          # invalid counted as ties, n = all
    assert r["score_valid"] == pytest.approx((5 + 0.5 * 2) / 10)              # invalid excluded, shown apart
    lo, hi = r["score_ci"]
    assert lo < r["score"] < hi


def _wilson_reference(s, n, z=1.959963984540054):
    p = s / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return c - h, c + h


@pytest.mark.parametrize("s,n", [(1, 3), (7.5, 12), (0.5, 1), (40, 41), (13, 100)])
def test_wilson_matches_formula(s, n):
    assert S.wilson_ci(s, n) == pytest.approx(_wilson_reference(s, n), abs=1e-12)


def test_bootstrap_outcomes_and_empty_language():
    rng = S.rng_for(0, "fi")
    r = J.score_outcomes(["win", "loss", "tie", "win"], ci="bootstrap", n_bootstrap=500, rng=rng)
    assert 0.0 <= r["score_ci"][0] <= r["score"] <= r["score_ci"][1] <= 1.0
    empty = J.score_outcomes([])
    assert empty["n"] == 0 and math.isnan(empty["score"]) and all(math.isnan(x) for x in empty["score_ci"])
    with pytest.raises(ValueError, match="outcomes must be drawn"):
        J.score_outcomes(["win", "draw"])
    with pytest.raises(ValueError, match="ci must be"):
        J.score_outcomes(["win"], ci="normal")


def test_bootstrap_ci_matches_loop_reference_and_is_seeded():
    rng0 = np.random.default_rng(5)
    sums = rng0.gamma(2.0, 3.0, size=23)
    counts = rng0.integers(1, 40, size=23)
    stat = lambda s, c: s.sum(1) / c.sum(1)  # noqa: E731
    got = S.bootstrap_ci((sums, counts), stat, n_bootstrap=300, alpha=0.1, rng=S.rng_for(3, "et"))
    # reference: the same draws, one resample at a time
    draws = S.rng_for(3, "et").integers(0, 23, size=(300, 23))
    vals = np.array([sums[d].sum() / counts[d].sum() for d in draws])
    assert got == pytest.approx(tuple(np.quantile(vals, [0.05, 0.95])), rel=1e-12)
    assert got == S.bootstrap_ci((sums, counts), stat, n_bootstrap=300, alpha=0.1, rng=S.rng_for(3, "et"))
    assert got != S.bootstrap_ci((sums, counts), stat, n_bootstrap=300, alpha=0.1, rng=S.rng_for(4, "et"))
    lo, hi = S.bootstrap_ci((sums[:0], counts[:0]), stat, rng=S.rng_for(0, "x"))
    assert math.isnan(lo) and math.isnan(hi)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_bootstrap"):
            S.bootstrap_ci((sums, counts), stat, n_bootstrap=bad, rng=S.rng_for(0, "x"))
    for bad in (0, 1, -0.1, 2):
        with pytest.raises(ValueError, match="alpha"):
            S.bootstrap_ci((sums, counts), stat, alpha=bad, rng=S.rng_for(0, "x"))


@pytest.mark.parametrize("text,expected", [
    ("A", "A"), (" B\n", "B"), ("**A**", "A"), ("'B'.", "B"), ("Response A", "A"), ("answer: b", "B"),
    ("[[A]]", "A"), ("After comparing both, my verdict is [[B]].", "B"), ("tie", "tie"), ("Tie.", "tie"),
    ("A good question, but B is better", None), ("[[A]] and [[B]]", None), ("", None), ("C", None),
    ("Both are fine", None), (None, None), (3, None),
])
def test_parse_verdict(text, expected):
    assert J.parse_verdict(text) == expected


# ------------------------------------------------------------------------------------------------------------
# side by side with callable judges


def _items(langs=("en", "fi", "zh")):
    items = []
    for lang in langs:
        for i in range(6):
            # a is better ("good") on even items, b on odd ones
            a, b = ("good answer", "bad") if i % 2 == 0 else ("bad", "good answer")
            items.append({"id": f"{lang}{i}", "lang": lang, "instruction": f"q{i}", "a": a, "b": b})
    return items


def test_side_by_side_consistent_judge():
    calls = []

    def judge(instruction, first, second):
        calls.append((instruction, first, second))
        return "A" if "good" in first else "B"

    res = J.side_by_side(_items(), judge, languages=["en", "fi", "zh", "ar"], names=("x", "y"))
    assert len(calls) == 2 * 18
    # both orders were asked for every item
    assert {(c[1], c[2]) for c in calls} == {("good answer", "bad"), ("bad", "good answer")}
    for lang in ("en", "fi", "zh"):
        r = res["languages"][lang]
        assert (r["n"], r["wins"], r["losses"], r["ties"], r["invalid"]) == (6, 3, 3, 0, 0)
        assert r["score"] == 0.5
    ar = res["languages"]["ar"]  # requested, no items: reported, not dropped
    assert ar["n"] == 0 and math.isnan(ar["score"])
    assert res["names"] == ["x", "y"]
    assert len(res["items"]) == 18


def test_side_by_side_position_biased_judge_gives_ties():
    res = J.side_by_side(_items(), lambda *_: "A")
    for r in res["languages"].values():
        assert (r["ties"], r["wins"], r["losses"], r["score"]) == (6, 0, 0, 0.5)


def test_side_by_side_nonsense_errors_and_empty_responses_are_counted():
    state = {"k": 0}

    def judge(instruction, first, second):
        state["k"] += 1
        if instruction == "q0":
            raise TimeoutError("judge timed out")
        if instruction == "q1":
            return "I cannot decide between these."
        if instruction == "q2":
            return 42
        return "A" if "good" in first else "B"

    items = _items(("en", "sw"))
    items[3]["a"] = ""      # en q3: empty response from a (b wins it)
    items[4]["b"] = None    # en q4: missing response from b
    res = J.side_by_side(items, judge, languages=["en", "sw"])
    en, sw = res["languages"]["en"], res["languages"]["sw"]
    for r in (en, sw):
        assert r["n"] == 6 and r["invalid"] == 3 and r["n_valid"] == 3
        assert r["wins"] + r["losses"] + r["ties"] + r["invalid"] == r["n"]
        assert r["invalid_reasons"]["unparseable"] == 4  # q1 and q2, both orders
        assert any(k.startswith("error: TimeoutError") for k in r["invalid_reasons"])
    assert en["empty_a"] == 1 and en["empty_b"] == 1 and sw["empty_a"] == 0
    assert en["score"] == pytest.approx((en["wins"] + 0.5 * (en["ties"] + 3)) / 6)
    # all-invalid language: score 0.5 by the tie rule, score_valid undefined
    res = J.side_by_side(_items(("he",)), lambda *_: "no idea")
    he = res["languages"]["he"]
    assert he["invalid"] == 6 and he["score"] == 0.5 and math.isnan(he["score_valid"])


def test_side_by_side_bad_input():
    with pytest.raises(ValueError, match="lang"):
        J.side_by_side([{"instruction": "x", "a": "1", "b": "2"}], lambda *_: "A")
    with pytest.raises(ValueError, match="instruction"):
        J.side_by_side([{"lang": "en", "a": "1", "b": "2"}], lambda *_: "A")
    with pytest.raises(TypeError, match="judge must be"):
        J.side_by_side(_items(), judge=3)
    with pytest.raises(TypeError, match="items must be"):
        J.side_by_side({"lang": "en"}, lambda *_: "A")

    class Short:
        def verdicts(self, requests):
            return [J.Verdict("A")]

    with pytest.raises(ValueError, match="verdicts for"):
        J.side_by_side(_items(), Short())


def test_side_by_side_languages_filter_sends_nothing_for_others():
    calls = []
    J.side_by_side(_items(("en", "fi")), lambda i, a, b: calls.append(i) or "A", languages=["fi"])
    assert len(calls) == 12


# ------------------------------------------------------------------------------------------------------------
# per-language loss


def _reference_losses(model, es):
    """Per example: HF's own loss (materialised logits) times the scored tokens, one example at a time."""
    out = []
    for i in range(len(es.tokens)):
        t = torch.tensor(es.tokens[i].astype(np.int64))[None]
        m = torch.tensor(es.loss_mask[i].astype(bool))[None]
        with torch.no_grad():
            loss = model(input_ids=t, labels=torch.where(m, t, -100)).loss
        out.append(float(loss) * int(m[:, 1:].sum()))
    return np.array(out)


def test_heldout_loss_matches_reference(model_a, hf_tok, heldout):
    es = encode_eval_set(heldout, hf_tok, languages=["en", "fi", "zh", "sw", "et"])
    assert len(es.tokens) == 64 and es.languages == ["en", "fi", "zh", "sw", "et"] and not es.skipped
    ref = _reference_losses(model_a, es)
    sums, counts, route = example_losses(model_a, es, batch_tokens=512)
    assert route.startswith("fused")
    np.testing.assert_allclose(sums, ref, rtol=2e-5)
    # batching does not change an example's loss; the materialised route agrees
    np.testing.assert_allclose(example_losses(model_a, es, batch_tokens=1 << 20)[0], sums, rtol=2e-5)
    plain, _, route2 = example_losses(model_a, es, fused="never", max_batch=3)
    assert route2.startswith("the model's logits")
    np.testing.assert_allclose(plain, sums, rtol=2e-5)

    res = heldout_loss(model_a, es, n_bootstrap=400, seed=1)
    langs = np.array(es.langs)
    for lang in ("en", "fi", "zh", "sw"):
        r = res["languages"][lang]
        sel = langs == lang
        assert r["n"] == 16 and r["tokens"] == int(counts[sel].sum())
        assert r["loss"] == pytest.approx(ref[sel].sum() / counts[sel].sum(), rel=2e-5)
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert r["loss_ci"][0] <= r["loss"] <= r["loss_ci"][1]
        assert r["ppl_ci"] == pytest.approx([math.exp(x) for x in r["loss_ci"]])
    et = res["languages"]["et"]  # requested but absent from the set: reported with n = 0
    assert et["n"] == 0 and math.isnan(et["loss"]) and et["tokens"] == 0
    # seeded and independent of the other languages
    again = heldout_loss(model_a, encode_eval_set(heldout, hf_tok, languages=["sw", "en"]), n_bootstrap=400, seed=1)
    assert again["languages"]["sw"]["loss_ci"] == pytest.approx(res["languages"]["sw"]["loss_ci"], rel=1e-9)
    assert json.loads(to_json(res))["languages"]["et"]["loss"] is None


def test_heldout_loss_plain_callables(model_a, hf_tok, heldout):
    es = encode_eval_set(heldout[:8], hf_tok)
    ref, counts, _ = example_losses(model_a, es)
    head = model_a.lm_head.weight

    def hidden_fn(ids, attn):
        return model_a.model(input_ids=ids, attention_mask=attn).last_hidden_state, head

    def logits_fn(ids, attn):
        return model_a(input_ids=ids, attention_mask=attn).logits

    for fn in (hidden_fn, logits_fn):
        got, c, _ = example_losses(fn, es)
        np.testing.assert_allclose(got, ref, rtol=2e-5)
        assert (c == counts).all()
    with pytest.raises(TypeError, match="must return logits"):
        example_losses(lambda ids, attn: "x", es)
    with pytest.raises(ValueError, match="fused='always'"):
        example_losses(logits_fn, es, fused="always")
    with pytest.raises(ValueError, match="fused must be"):
        example_losses(model_a, es, fused="sometimes")
    with pytest.raises(ValueError, match="batch_tokens"):
        example_losses(model_a, es, batch_tokens=0)


def test_store_loss_through_the_loader_matches_padded(model_a, hf_tok, heldout, tmp_path):
    from mlmix.eval.loss import store_loss

    es = encode_eval_set(heldout, hf_tok)
    mlmix.write_store(tmp_path / "s", es.tokens, seq_len=512, loss_mask=es.loss_mask, langs=es.langs, strategy="bfd")
    padded = heldout_loss(model_a, es, n_bootstrap=50)
    packed = store_loss(model_a, tmp_path / "s", batch_size=3, n_bootstrap=50, languages=["en", "fi", "zh", "sw", "ar"])
    assert "PackedDataset" in packed["route"]
    for lang in ("en", "fi", "zh", "sw"):
        p, q = padded["languages"][lang], packed["languages"][lang]
        assert (q["n"], q["tokens"]) == (p["n"], p["tokens"]) == (16, p["tokens"])
        assert q["loss"] == pytest.approx(p["loss"], rel=1e-5)  # block-diagonal mask: as if each were alone
        assert q["loss_ci"][0] <= q["loss"] <= q["loss_ci"][1]
    assert packed["languages"]["ar"]["n"] == 0
    mlmix.write_store(tmp_path / "nolang", es.tokens, seq_len=512, loss_mask=es.loss_mask)
    with pytest.raises(ValueError, match="no languages"):
        store_loss(model_a, tmp_path / "nolang")


def test_encode_eval_set_counts_bad_records(hf_tok):
    recs = demo_records(split="heldout", langs=["en"])[:4]
    recs = recs + [{"lang": "en", "id": "x1", "instruction": "only a question"},          # no response
                   {"lang": "fi", "id": "x2", "messages": [{"role": "wizard", "content": "?"}]}]  # bad role
    es = encode_eval_set(recs, hf_tok, languages=["en", "fi", "ar"])
    assert len(es.tokens) == 4 and es.skipped == {"en": 1, "fi": 1}
    with pytest.raises(ValueError, match=r"records\[0\] must carry a language"):
        encode_eval_set([{"instruction": "a", "response": "b"}], hf_tok)
    with pytest.raises(ValueError, match="languages must be a list"):
        encode_eval_set(recs, hf_tok, languages="en")


# ------------------------------------------------------------------------------------------------------------
# generation


def test_generate_greedy_and_seeded_sampling(model_a, hf_tok, heldout):
    instr = [r["instruction"] for r in heldout[:6]]
    g1 = generate(model_a, hf_tok, instr, max_new_tokens=6, batch_size=4)
    assert len(g1) == 6 and all(isinstance(s, str) for s in g1)
    assert generate(model_a, hf_tok, instr, max_new_tokens=6, batch_size=4) == g1
    s1 = generate(model_a, hf_tok, instr, max_new_tokens=6, batch_size=3, do_sample=True, top_p=0.9, seed=7)
    assert generate(model_a, hf_tok, instr, max_new_tokens=6, batch_size=3, do_sample=True, top_p=0.9, seed=7) == s1
    with pytest.raises(ValueError, match="instructions must be a list"):
        generate(model_a, hf_tok, "one string")
    with pytest.raises(ValueError, match="top_p"):
        generate(model_a, hf_tok, instr, do_sample=True, top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model_a, hf_tok, instr, max_new_tokens=0)


def test_generate_empty_responses_are_kept(hf_tok, heldout):
    mute = tiny_lm(len(hf_tok), 3)
    with torch.no_grad():
        mute.lm_head.weight.zero_()  # every logit 0: argmax is token 0, a special token that decodes to ""
    out = generate(mute, hf_tok, [r["instruction"] for r in heldout[:3]], max_new_tokens=3)
    assert out == ["", "", ""]


# ------------------------------------------------------------------------------------------------------------
# language fidelity


def test_fidelity_all_study_languages():
    recs = demo_records(split="heldout")
    res = language_fidelity([{"id": r["id"], "lang": r["lang"], "response": r["response"]} for r in recs])
    assert list(res["languages"]) == list(DEMO_LANGUAGES)
    assert set(res["candidates"]) == set(DEMO_LANGUAGES)
    for lang, r in res["languages"].items():
        assert (r["n"], r["in_language"], r["empty"], r["share"]) == (16, 16, 0, 1.0), lang
        assert r["share_ci"][0] < 1.0 == r["share_ci"][1]
    # unrestricted labels: still the right language for these answers
    res_all = language_fidelity([{"lang": r["lang"], "response": r["response"]} for r in recs], candidates="all")
    assert res_all["candidates"] == "all"
    assert all(r["share"] == 1.0 for r in res_all["languages"].values())


def test_fidelity_failures_empty_and_missing():
    en = {r["id"]: r["response"] for r in demo_records(split="heldout", langs=["en"])}
    rows = []
    for r in demo_records(split="heldout", langs=["fi", "ar"]):
        i = int(r["id"][1:])
        # a quarter answered in English, one empty, one missing
        text = en[r["id"]] if i % 4 == 0 else r["response"]
        text = "" if i == 1 else None if i == 2 else text
        rows.append({"id": r["id"], "lang": r["lang"], "response": text})
    res = language_fidelity(rows, languages=["fi", "ar", "cs", "xx"])
    for lang in ("fi", "ar"):
        r = res["languages"][lang]
        assert r["n"] == 16 and r["empty"] == 2 and r["in_language"] == 10
        assert r["detected"]["en"] == 4
        assert r["share"] == pytest.approx(10 / 16)
    assert res["languages"]["cs"]["n"] == 0 and math.isnan(res["languages"]["cs"]["share"])
    assert res["languages"]["xx"]["unsupported"] is True
    with pytest.raises(ValueError, match="candidates"):
        language_fidelity(rows, candidates=["fi", "klingon"])
    with pytest.raises(ValueError, match="lang"):
        language_fidelity([{"response": "hello"}])


# ------------------------------------------------------------------------------------------------------------
# transformers judge and the whole evaluation


def test_transformers_judge(model_a, hf_tok):
    judge = J.TransformersJudge(model_a, hf_tok, batch_size=5)
    items = _items(("en", "it"))
    res = J.side_by_side(items, judge)
    for r in res["languages"].values():
        assert r["n"] == 6 and r["invalid"] == 0
        assert r["wins"] + r["losses"] + r["ties"] == 6
    # batching does not change the verdicts
    again = J.side_by_side(items, J.TransformersJudge(model_a, hf_tok, batch_size=1))
    assert [p["outcome"] for p in again["items"]] == [p["outcome"] for p in res["items"]]
    with pytest.raises(ValueError, match="single token"):
        J.TransformersJudge(model_a, hf_tok, labels=("Response one", "Response two"))


def _length_judge(instruction, first, second):
    """Deterministic: prefers the longer response, "tie" when equally long."""
    return "A" if len(first) > len(second) else "B" if len(second) > len(first) else "tie"


def test_evaluate_end_to_end(model_a, model_b, hf_tok, tmp_path):
    recs = demo_records(split="heldout", langs=["en", "ar", "hi"])
    recs = [r for r in recs if not (r["lang"] == "hi" and r["id"] == "h003")]  # one missing item in hi
    langs = ["en", "ar", "hi", "cs"]  # cs: no records at all
    kw = dict(languages=langs, generation={"max_new_tokens": 4, "batch_size": 8}, judge=_length_judge,
              baseline="b", n_bootstrap=200, seed=3)
    res = evaluate({"a": (model_a, hf_tok), "b": (model_b, hf_tok)}, recs, **kw)
    assert res["languages"] == langs and res["models"] == ["a", "b"]
    expected_n = {"en": 16, "ar": 16, "hi": 15, "cs": 0}
    for name in ("a", "b"):
        for lang, n in expected_n.items():
            assert res["loss"][name]["languages"][lang]["n"] == n
            assert res["fidelity"][name]["languages"][lang]["n"] == n
    pair = res["judge"]["pairs"]["a"]
    assert res["judge"]["baseline"] == "b" and "b" not in res["judge"]["pairs"]
    for lang, n in expected_n.items():
        r = pair["languages"][lang]
        assert r["n"] == n and r["wins"] + r["losses"] + r["ties"] + r["invalid"] == n
    # the judge's verdicts agree with the responses it saw
    by_id = {(row["lang"], row["id"]): row["response"] for row in res["responses"]["a"]}
    by_id_b = {(row["lang"], row["id"]): row["response"] for row in res["responses"]["b"]}
    for item in pair["items"]:
        la, lb = len(by_id[item["lang"], item["id"]]), len(by_id_b[item["lang"], item["id"]])
        assert item["outcome"] == ("win" if la > lb else "loss" if lb > la else "tie")

    doc = json.loads(to_json(res))
    assert doc["judge"]["pairs"]["a"]["languages"]["cs"]["score"] is None
    table = format_table(res)
    for lang in langs:
        assert f"\n{lang} " in table
    assert "no examples" in table
    svg = chart(res, "judge")
    assert svg.startswith("<?xml") and "<svg" in svg and all(f">{lang}<" in svg for lang in langs)
    assert chart(res, "judge") == svg  # same results, same bytes
    assert chart(res, "loss", fmt="png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in chart(res, "fidelity")
    with pytest.raises(ValueError, match="metric"):
        chart(res, "bleu")
    section = html_section(res)
    assert section.count("<svg") == 3 and "<?xml" not in section and "Wilson" in section
    # rerun: identical results
    assert to_json(evaluate({"a": (model_a, hf_tok), "b": (model_b, hf_tok)}, recs, **kw)) == to_json(res)


def test_evaluate_with_given_responses_and_bad_args(model_a, hf_tok):
    recs = demo_records(split="heldout", langs=["it"])[:4]
    res = evaluate({"m": (model_a, hf_tok), "ref": None}, recs, loss=False,
                   responses={"ref": [r["response"] for r in recs], "m": ["", None, "ciao a tutti", "x"]},
                   judge=_length_judge, baseline="ref")
    it = res["judge"]["pairs"]["m"]["languages"]["it"]
    assert it["n"] == 4 and it["empty_a"] == 2 and it["losses"] == 4
    assert res["fidelity"]["m"]["languages"]["it"]["empty"] == 2
    assert res["fidelity"]["ref"]["languages"]["it"]["share"] == 1.0
    with pytest.raises(ValueError, match="one response per record"):
        evaluate({"m": None}, recs, responses={"m": ["x"]})
    with pytest.raises(ValueError, match="baseline"):
        evaluate({"m": None}, recs, baseline="other")


def test_cli_end_to_end(model_a, model_b, hf_tok, tmp_path, capsys):
    for name, m in (("a", model_a), ("b", model_b)):
        m.save_pretrained(tmp_path / name)
        hf_tok.save_pretrained(tmp_path / name)
    data = tmp_path / "eval.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for r in demo_records(split="heldout", langs=["es", "ru"])[:20]:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    cfg = {
        "data": {"source": str(data), "languages": ["es", "ru", "fi"]},
        "models": [{"name": "a", "path": str(tmp_path / "a")}, {"name": "b", "path": str(tmp_path / "b")}],
        "generate": {"max_new_tokens": 3},
        "judge": {"kind": "transformers", "path": str(tmp_path / "a"), "baseline": "b"},
        "stats": {"bootstrap": 100},
        "output": str(tmp_path / "out"),
    }
    (tmp_path / "eval.json").write_text(json.dumps(cfg))
    assert main([str(tmp_path / "eval.json"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["judge"]["pairs"]["a"]["languages"]["es"]["n"] == 16
    assert doc["judge"]["pairs"]["a"]["languages"]["ru"]["n"] == 4
    assert doc["loss"]["b"]["languages"]["fi"]["n"] == 0
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text())["models"] == ["a", "b"]
    assert (out / "judge.svg").is_file() and (out / "loss.svg").is_file() and (out / "fidelity.svg").is_file()
    assert len((out / "responses" / "a.jsonl").read_text().splitlines()) == 20

    bad = dict(cfg, judge={"kind": "http", "baseline": "b"})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main([str(tmp_path / "bad.json")]) == 1
    assert "base_url" in capsys.readouterr().err


def test_cli_without_a_judge_says_what_is_absent_and_template_key(model_a, hf_tok, tmp_path, capsys):
    """A model whose tokenizer has no chat template: `template = "auto"` is an error naming the key, and
    `template = "chatml"` evaluates it; no judge configured: the table and results say which columns are
    absent and how to add them, and fill nothing in."""
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tok.backend_tokenizer, eos_token="<|im_end|>",
                                                 pad_token="<|endoftext|>")
    assert not plain.chat_template
    model_a.save_pretrained(tmp_path / "m")
    plain.save_pretrained(tmp_path / "m")
    cfg = {"data": {"source": "demo", "languages": ["en", "sw"], "max_per_language": 2},
           "models": [{"name": "m", "path": str(tmp_path / "m")}],
           "generate": {"max_new_tokens": 2}, "stats": {"bootstrap": 50}, "output": str(tmp_path / "out")}
    (tmp_path / "eval.json").write_text(json.dumps(cfg))
    assert main([str(tmp_path / "eval.json")]) == 1
    assert 'no chat template; set template = "chatml" or "llama3"' in capsys.readouterr().err

    cfg["models"][0]["template"] = "chatml"
    (tmp_path / "eval.json").write_text(json.dumps(cfg))
    assert main([str(tmp_path / "eval.json")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "== m" in out and "loss [95% CI]" in out
    assert "not measured: judge: no [judge] in the config" in out and 'kind = "http"' in out
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "judge" not in res and "judge" in res["absent"]
    assert not (tmp_path / "out" / "judge.svg").exists()
    with pytest.raises(ValueError, match="models\\[0\\].template"):
        load_config({"models": [{"name": "a", "path": "x", "template": "alpaca"}]})


@pytest.mark.parametrize("patch,match", [
    ({"models": []}, "models"),
    ({"models": [{"name": "a"}]}, "path"),
    ({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "unique"),
    ({"modles": []}, "unknown key"),
    ({"judge": {"kind": "oracle"}}, "judge.kind"),
    ({"judge": {"kind": "http", "base_url": "http://x", "model": "m", "baseline": "zz"}}, "judge.baseline"),
    ({"stats": {"alpha": 1.5}}, "alpha"),
    ({"data": {"languages": "en"}}, "data.languages"),
    ({"device": "tpu"}, "device"),
])
def test_config_errors(patch, match):
    cfg = {"models": [{"name": "a", "path": "somewhere"}], **patch}
    with pytest.raises(ValueError, match=match):
        load_config(cfg)


def test_lazy_import_does_not_load_torch_subprocess():
    import subprocess
    import sys

    code = "import sys, mlmix.eval as e; e.run; e.side_by_side; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__('os').environ})
    assert out.stdout.strip() == "False"
    assert mlmix.eval.evaluate is evaluate
