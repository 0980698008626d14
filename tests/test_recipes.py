"""The study's mixture recipes: exact counts, disjoint sources, missing translations, bad input."""

from __future__ import annotations

import collections
import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlmix import recipes as R
from mlmix.recipes import Mixture

N_SOURCES = 4640  # the study's set: 1,000 LIMA + 3,640 OpenAssistant examples


def parallel_rows(n=N_SOURCES, langs=R.STUDY_LANGUAGES, missing=None):
    """Every source in every language, except the (source, lang) pairs in ``missing``."""
    missing = missing or set()
    return [{"id": i, "lang": lang} for i in range(n) for lang in langs if (i, lang) not in missing]


@pytest.fixture(scope="module")
def study_rows():
    return parallel_rows()


def check_disjoint_and_available(m: Mixture, rows) -> None:
    ids = [sid for sid, _ in m.rows]
    assert len(ids) == len(set(ids)), "a source id appears twice"
    available = {(r["id"], r["lang"]) for r in rows}
    assert set(m.rows) <= available


def spread(counts: dict, langs) -> int:
    values = [counts[lang] for lang in langs]
    return max(values) - min(values)


def test_pinch_counts(study_rows):
    m = R.pinch(study_rows, seed=3)
    counts = m.counts()
    assert counts["en"] == N_SOURCES - 40 == 4600
    others = [lang for lang in R.STUDY_LANGUAGES if lang != "en"]
    # 40 = 11 * 3 + 7: seven languages get 4, four get 3
    assert sorted(counts[lang] for lang in others) == [3] * 4 + [4] * 7
    assert len(m.rows) == N_SOURCES
    check_disjoint_and_available(m, study_rows)
    assert m.shortfall() == {}
    # the seed decides which languages get the extra example, and nothing else changes
    other = R.pinch(study_rows, seed=4)
    assert other.counts()["en"] == 4600
    again = R.pinch(study_rows, seed=3)
    assert again.rows == m.rows


@pytest.mark.parametrize("percent", [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 12.5])
def test_percent_mixture_counts(study_rows, percent):
    n_multi = math.floor(N_SOURCES * percent / 100 + 0.5)
    others = [lang for lang in R.STUDY_LANGUAGES if lang != "en"]
    # default: the multilingual share is spread over all 12 languages, English included
    m = R.percent_mixture(study_rows, percent=percent, seed=1)
    counts = m.counts()
    shares = {lang: counts[lang] - (N_SOURCES - n_multi if lang == "en" else 0) for lang in R.STUDY_LANGUAGES}
    assert sum(shares.values()) == n_multi
    assert spread(shares, list(R.STUDY_LANGUAGES)) <= 1
    assert len(m) == N_SOURCES
    check_disjoint_and_available(m, study_rows)
    if percent == 100:
        assert spread(counts, list(R.STUDY_LANGUAGES)) <= 1  # the even 12-language mixture
    # spread over the non-English languages only
    m = R.percent_mixture(study_rows, percent=percent, seed=1, spread_over="others")
    counts = m.counts()
    assert counts["en"] == N_SOURCES - n_multi
    assert sum(counts[lang] for lang in others) == n_multi
    assert spread(counts, others) <= 1
    assert len(m) == N_SOURCES
    check_disjoint_and_available(m, study_rows)


def test_unseen_split_diversity_bilingual_monolingual(study_rows):
    m = R.unseen_split(study_rows, seed=2)
    assert list(m.counts()) == list(R.UNSEEN_TUNING)
    assert sorted(m.counts().values()) == [773] * 4 + [774] * 2  # 4640 = 6 * 773 + 2
    assert m.params["heldout"] == list(R.UNSEEN_HELDOUT)
    check_disjoint_and_available(m, study_rows)
    for k in range(1, 7):
        d = R.language_diversity(study_rows, k, seed=5)
        assert list(d.counts()) == list(R.DIVERSITY_ORDER[:k])
        assert sum(d.counts().values()) == N_SOURCES and spread(d.counts(), R.DIVERSITY_ORDER[:k]) <= 1
        check_disjoint_and_available(d, study_rows)
    b = R.bilingual(study_rows, ("en", "sw"), total=4639, seed=0)
    assert sorted(b.counts().values()) == [2319, 2320]
    mono = R.monolingual(study_rows, "fi")
    assert mono.counts() == {"fi": N_SOURCES} and sorted(s for s, _ in mono.rows) == list(range(N_SOURCES))
    assert R.monolingual(study_rows, "fi", n=10, seed=1).counts() == {"fi": 10}


def test_missing_translations_keep_balance_exactly():
    # 300 sources; the scarce languages (sw, et) exist only for a few; en misses some
    rng = np.random.default_rng(0)
    langs = ("en", "sw", "et", "fi")
    missing = set()
    for i in range(300):
        if i >= 40:
            missing |= {(i, "sw")}
        if i % 3 == 0 or i >= 60:
            missing |= {(i, "et")}
        if rng.random() < 0.2:
            missing |= {(i, "en")}
    rows = parallel_rows(300, langs, missing)
    # sw sources are all among the first 40 and et among the first 60: a greedy could starve one
    m = R.language_diversity(rows, 4, order=("sw", "et", "fi", "en"), total=80)
    assert m.counts() == {"sw": 20, "et": 20, "fi": 20, "en": 20}
    check_disjoint_and_available(m, rows)
    # infeasible: sw and et need 60 each but have 40 each, and only 54 sources hold either
    # (sw: ids 0-39; et: ids < 60 not divisible by 3)
    with pytest.raises(ValueError, match="on_shortfall"):
        R.language_diversity(rows, 4, order=("sw", "et", "fi", "en"), total=240)
    t = R.language_diversity(rows, 4, order=("sw", "et", "fi", "en"), total=240, on_shortfall="take_all")
    check_disjoint_and_available(t, rows)
    got = t.counts()
    assert got["sw"] + got["et"] == 54 and got["fi"] == got["en"] == 60  # a maximum assignment
    assert t.shortfall() == {"sw": 60 - got["sw"], "et": 60 - got["et"]}
    assert "missing" in t.to_table()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    n_langs=st.integers(1, 4),
    p_missing=st.sampled_from([0.0, 0.3, 0.7]),
    seed=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_assignment_is_exact_whenever_feasible(n, n_langs, p_missing, seed, data):
    """Compare with brute force: targets are met iff some disjoint assignment meets them."""
    langs = ("a", "b", "c", "d")[:n_langs]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    rows = [{"id": i, "lang": lang} for i in range(n) for lang in langs if rng.random() >= p_missing]
    if not {r["lang"] for r in rows} >= set(langs):
        return
    total = data.draw(st.integers(0, n))
    m = R.language_diversity(rows, n_langs, order=langs, total=total, seed=seed, on_shortfall="take_all")
    check_disjoint_and_available(m, rows)
    targets = R.even_split(total, langs, seed)
    assert m.targets == targets
    # max-flow optimality: no assignment gets more rows (checked by a bipartite matching on copies)
    avail = collections.defaultdict(set)
    for r in rows:
        avail[r["id"]].add(r["lang"])
    slots = [lang for lang in langs for _ in range(targets[lang])]
    match: dict = {}

    def augment(slot_i, seen):
        for sid in range(n):
            if slots[slot_i] in avail[sid] and sid not in seen:
                seen.add(sid)
                if sid not in match or augment(match[sid], seen):
                    match[sid] = slot_i
                    return True
        return False

    best = sum(augment(i, set()) for i in range(len(slots)))
    assert len(m.rows) == best
    for lang, c in m.counts().items():
        assert c <= targets[lang]


def test_uniform_choice_of_sources_chi_square():
    """Over many seeds each source is the pinch's sw example equally often (false alarm 1e-4)."""
    n, reps = 30, 1500
    rows = parallel_rows(n, ("en", "sw"))
    counts = np.zeros(n)
    for seed in range(reps):
        m = R.pinch(rows, n_multilingual=1, pivot="en", languages=("en", "sw"), seed=seed)
        (sid,) = [s for s, lang in m.rows if lang == "sw"]
        counts[sid] += 1
    stat = float(((counts - reps / n) ** 2 / (reps / n)).sum())
    df = n - 1
    critical = df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty, 1e-4
    assert stat < critical, (stat, counts)


def test_row_order_and_input_forms_do_not_matter(study_rows):
    pa = pytest.importorskip("pyarrow")
    pd = pytest.importorskip("pandas")
    rows = study_rows[:1200]
    want = R.percent_mixture(rows, percent=30, seed=9)
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    assert R.percent_mixture(shuffled, percent=30, seed=9).rows == want.rows
    assert R.percent_mixture(iter(rows), percent=30, seed=9).rows == want.rows
    table = pa.table({"src": [r["id"] for r in rows], "language": [r["lang"] for r in rows]})
    assert R.percent_mixture(table, percent=30, seed=9, id_field="src", lang_field="language").rows == want.rows
    frame = pd.DataFrame({"id": [r["id"] for r in rows], "lang": [r["lang"] for r in rows]})
    assert R.percent_mixture(frame, percent=30, seed=9).rows == want.rows


def test_string_source_ids():
    rows = [{"id": f"lima-{i}", "lang": lang} for i in range(50) for lang in ("en", "he", "hi")]
    m = R.pinch(rows, n_multilingual=5, languages=("en", "he", "hi"), seed=1)
    assert m.counts()["en"] == 45 and sorted([m.counts()["he"], m.counts()["hi"]]) == [2, 3]
    check_disjoint_and_available(m, rows)


def test_save_load_round_trip(tmp_path, study_rows):
    m = R.pinch(study_rows[:600], n_multilingual=11, seed=2)
    path = tmp_path / "mix" / "pinch.json"
    m.save(path)
    back = Mixture.load(path)
    assert back == m and back.counts() == m.counts()
    assert path.stat().st_size < 20_000
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="mixture"):
        Mixture.load(bad)


def test_allocation_policies():
    sizes = {"en": 1_000_000, "fi": 10_000, "sw": 100}
    prop = R.allocate_proportional(sizes, 1000)
    assert sum(prop.values()) == 1000 and prop["en"] == 990
    temp = R.allocate_temperature(sizes, 1000, alpha=0.3)
    assert sum(temp.values()) == 1000 and temp["en"] > temp["fi"] > temp["sw"] > prop["sw"]
    # p proportional to n^0.3: check against the real quotas, within one for the rounding
    z = sum(n**0.3 for n in sizes.values())
    for lang, n in sizes.items():
        assert abs(temp[lang] - 1000 * n**0.3 / z) < 1
    assert R.allocate_temperature(sizes, 999, alpha=0.0) == {"en": 333, "fi": 333, "sw": 333}
    uni = R.allocate_unimax(sizes, 30_000)
    assert uni == {"en": 19_900, "fi": 10_000, "sw": 100}  # sw and fi capped at one epoch
    assert R.allocate_unimax(sizes, 30_000, max_epochs=4) == {"en": 14_800, "fi": 14_800, "sw": 400}


def test_temperature_and_unimax_recipes():
    rows = parallel_rows(200, ("en", "fi")) + [{"id": 1000 + i, "lang": "en"} for i in range(800)]
    m = R.temperature(rows, alpha=0.0, total=300)
    assert m.counts() == {"en": 150, "fi": 150}
    check_disjoint_and_available(m, rows)
    u = R.unimax(rows, total=600)
    assert u.counts() == {"en": 400, "fi": 200}
    tok_rows = [dict(r, n_tokens=10 if r["lang"] == "en" else 20) for r in rows]
    t = R.temperature(tok_rows, alpha=1.0, total=2000, tokens="n_tokens")
    # token sizes en 10,000 / fi 4,000 -> token budgets 1429 / 571 -> examples 143 / 29
    assert t.counts() == {"en": 143, "fi": 29}
    assert t.params["unit"] == "tokens"


# -- bad input --------------------------------------------------------------------------------------
def test_bad_input_errors(study_rows):
    rows = study_rows[:1200]  # 100 sources
    with pytest.raises(ValueError, match="languages.*'xx'"):
        R.pinch(rows, languages=("en", "xx"))
    with pytest.raises(ValueError, match="pivot"):
        R.pinch(rows, pivot="de")
    with pytest.raises(ValueError, match="percent"):
        R.percent_mixture(rows, percent=101)
    with pytest.raises(ValueError, match="percent"):
        R.percent_mixture(rows, percent=-1)
    with pytest.raises(ValueError, match="percent"):
        R.percent_mixture(rows, percent=float("nan"))
    with pytest.raises(ValueError, match="k must"):
        R.language_diversity(rows, 7, order=R.DIVERSITY_ORDER)
    with pytest.raises(ValueError, match="k must"):
        R.language_diversity(rows, 13)  # the default order holds the data's 12 languages
    with pytest.raises(ValueError, match="k must"):
        R.language_diversity(rows, 0)
    with pytest.raises(ValueError, match="pair"):
        R.bilingual(rows, ("en",))
    with pytest.raises(ValueError, match="pair"):
        R.bilingual(rows, ("en", "en"))
    with pytest.raises(ValueError, match="twice"):
        R.monolingual(rows + [rows[0]], "en")
    with pytest.raises(ValueError, match="lang.*'de'"):
        R.monolingual(rows, "de")  # an empty stratum
    with pytest.raises(ValueError, match="tuning and heldout"):
        R.unseen_split(rows, tuning=("en", "ar"), heldout=("ar",))
    with pytest.raises(ValueError, match="field 'id'"):
        R.monolingual([{"src": 1, "lang": "en"}], "en")
    with pytest.raises(ValueError, match="source id"):
        R.monolingual([{"id": 1.5, "lang": "en"}], "en")
    with pytest.raises(ValueError, match="on_shortfall"):
        R.pinch(rows, on_shortfall="ignore")
    with pytest.raises(ValueError, match="seed"):
        R.pinch(rows, seed=-3)
    with pytest.raises(ValueError, match="n_multilingual"):
        R.pinch(rows, n_multilingual=-1)
    with pytest.raises(ValueError, match="exceed"):
        R.pinch(rows, n_multilingual=10_000)
    with pytest.raises(ValueError, match="sizes"):
        R.allocate_temperature({"en": float("inf")}, 10)
    with pytest.raises(ValueError, match="sizes"):
        R.allocate_proportional({"en": -1}, 10)
    with pytest.raises(ValueError, match="alpha"):
        R.allocate_temperature({"en": 1}, 10, alpha=float("nan"))
    with pytest.raises(ValueError, match="max_epochs"):
        R.unimax(rows, max_epochs=2)
    with pytest.raises(ValueError, match="token counts"):
        R.temperature([{"id": 1, "lang": "en", "n": -5}], tokens="n")
    with pytest.raises(TypeError, match="rows"):
        R.pinch("en")


def test_even_split_properties():
    for total, n in itertools.product([0, 1, 40, 41, 4640], [1, 2, 11, 12]):
        langs = [f"l{i}" for i in range(n)]
        split = R.even_split(total, langs, seed=total)
        assert sum(split.values()) == total and max(split.values()) - min(split.values()) <= 1


def test_languages_default_to_the_data():
    """Recipes whose languages are not given use the data's: the study's 12 that are present in the study's
    order, then others by code; a corpus in three languages is no longer an error about the nine it lacks."""
    rows = parallel_rows(30, langs=("de", "es", "en"))
    assert R.data_languages(rows) == ["en", "es", "de"]
    m = R.pinch(rows, n_multilingual=4)
    assert m.params["languages"] == ["en", "es", "de"] and m.counts() == {"en": 26, "es": 2, "de": 2}
    check_disjoint_and_available(m, rows)
    m = R.percent_mixture(rows, percent=50)
    assert list(m.params) == ["percent", "pivot", "languages", "spread_over", "total"]
    assert m.params["languages"] == ["en", "es", "de"] and sum(m.counts().values()) == 30
    m = R.language_diversity(rows, k=2)
    assert m.params["order"] == ["en", "es", "de"] and set(m.counts()) == {"en", "es"}
    m = R.unseen_split(rows)
    assert m.params["tuning"] == ["en"] and m.counts() == {"en": 30}
    with pytest.raises(ValueError, match="pivot 'fr' has no rows; languages in rows"):
        R.pinch(rows, pivot="fr")
    with pytest.raises(ValueError, match="languages names language 'sw', which has no rows"):
        R.pinch(rows, languages=("en", "sw"))  # languages given: still each must have rows
    with pytest.raises(ValueError, match="none of the study's tuning languages"):
        R.unseen_split(parallel_rows(5, langs=("de", "cs")))


def test_defaults_on_the_study_set_are_unchanged(study_rows):
    assert R.data_languages(study_rows) == list(R.STUDY_LANGUAGES)
    assert R.pinch(study_rows, seed=3).rows == R.pinch(study_rows, languages=R.STUDY_LANGUAGES, seed=3).rows
    assert (R.percent_mixture(study_rows, percent=30, seed=1).rows
            == R.percent_mixture(study_rows, percent=30, languages=R.STUDY_LANGUAGES, seed=1).rows)
    assert (R.language_diversity(study_rows, k=4).rows
            == R.language_diversity(study_rows, k=4, order=R.DIVERSITY_ORDER).rows)


def test_mixture_prints_its_parameters_readably():
    m = R.pinch(parallel_rows(20, langs=("en", "sw")), n_multilingual=2)
    assert str(m).splitlines()[0] == "pinch(n_multilingual=2, pivot=en, languages=[en, sw], total=20), seed 0"
    assert repr(m) == "Mixture(recipe='pinch', seed=0, rows=20, counts={'en': 18, 'sw': 2})"


# ---- seeded orders of string ids: hashed in the core, the same order as the Python key -----------
def _python_order(items, seed, tag):
    return sorted(items, key=lambda x: (R._hash_u64(seed, tag, x), type(x).__name__, str(x)))


_IDS = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=150), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ids=_IDS, seed=st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1)),
       tag=st.sampled_from(["assign", "rows-en", "rows-\u00e9\u4e2d", "x" * 130]), k=st.integers(-1, 45))
def test_string_orders_equal_python_key(ids, seed, tag, k):
    import heapq

    assert R._seeded_order(list(ids), seed, tag) == _python_order(ids, seed, tag)  # duplicates included
    unique = list(dict.fromkeys(ids))
    want = heapq.nsmallest(k, unique, key=lambda x: R.assign_order_key(seed, x))
    assert R.assign_bottom_k(seed, unique, k) == want


def test_string_orders_fall_back_where_the_core_does_not_apply():
    ids = ["b", "a", "c", "a"]
    # a tie (the same id twice), ids of mixed types, str subclasses: Python's key decides, as before
    assert R._order_of_strings(0, "assign", ids) is None
    assert R._seeded_order(ids, 3, "assign") == _python_order(ids, 3, "assign")
    mixed = ["a", 1, "b", 2.5]
    assert R._order_of_strings(0, "assign", mixed) is None
    assert R._seeded_order(mixed, 3, "assign") == _python_order(mixed, 3, "assign")

    class Sub(str):
        pass

    sub = [Sub("a"), "b"]
    assert R._order_of_strings(0, "assign", sub) is None
    assert R._seeded_order(sub, 0, "t") == _python_order(sub, 0, "t")
    # a string that does not encode, a seed outside [0, 2**64): the Python key's error, as before
    with pytest.raises(UnicodeEncodeError):
        R._seeded_order(["a", "\ud800"], 0, "t")
    with pytest.raises(OverflowError):
        R._seeded_order(["a", "b"], 2**64, "t")
    with pytest.raises(OverflowError):
        R.assign_bottom_k(-1, ["a", "b"], 1)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.one_of(st.text(), st.integers(-2**70, 2**70)), max_size=20))
def test_build_source_ids_are_json(ids):
    """The build's grouping key of each record id is its JSON (what the executors and the mixture's
    selected (id, language) pairs compare), read back to the same id."""
    from mlmix.engine.stages import mix

    sids = mix.sids(ids)
    assert sids == [json.dumps(x) for x in ids]
    assert [mix.source_id(s) for s in sids] == [json.loads(s) for s in sids]
    for bad in ['"a', '"\\x"', '"a"b', '"\t"']:  # not what sids() writes: json.loads' own error
        with pytest.raises(json.JSONDecodeError):
            mix.source_id(bad)
    assert mix.source_id('"a" ') == "a"
