"""mlmix meets a user's file system: it never touches what it did not write, and reads exactly what the
config names.

Each case builds a small project tree in a temporary folder (config, data, the user's other files),
makes the mistake a user makes, runs the command as they would (``mlmix.cli.main`` with its exit status,
or the Python API), and hashes the tree before and after: nothing outside mlmix's own outputs may change.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

import mlmix
from mlmix import _outputs
from mlmix.cli import main

from pipeline_data import parallel_rows, train_tiny_bpe, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    return train_tiny_bpe(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def tree(root, skip=()) -> dict[str, str]:
    """Every path under ``root`` (links not followed) -> what it is: a file's sha256, a link's target."""
    skip = [os.path.join(str(root), s) for s in skip]
    out = {}
    for base, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(base, d) not in skip]
        for name in dirs + files:
            p = os.path.join(base, name)
            rel = os.path.relpath(p, root)
            if p in skip:
                continue
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def project(root, tokenizer, *, output="runs/a", source="data", top="", extra="") -> str:
    """A user's project: config.toml, data/{en,ru}.jsonl, a notes file and a thesis folder."""
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    rows = parallel_rows(2)
    write_jsonl(os.path.join(root, "data", "en.jsonl"), [r for r in rows if r["lang"] == "en"])
    write_jsonl(os.path.join(root, "data", "ru.jsonl"), [r for r in rows if r["lang"] != "en"])
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("my notes\n")
    os.makedirs(os.path.join(root, "thesis"), exist_ok=True)
    with open(os.path.join(root, "thesis", "chapter1.tex"), "w") as f:
        f.write("\\chapter{One}\n")
    cfg = (f'output = {json.dumps(output)}\n{top}\nreport = false\n[[sources]]\npath = {json.dumps(source)}\n'
           f'[tokenizer]\npath = {json.dumps(tokenizer)}\ntemplate = "chatml"\n'
           f'[langid]\nbackend = "none"\n[dedup]\nnear = false\n[pack]\nseq_len = 256\n{extra}\n')
    path = os.path.join(root, "config.toml")
    with open(path, "w") as f:
        f.write(cfg)
    return path


def _write_text(path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


# ---- never delete or overwrite what mlmix did not make -------------------------------------------
@pytest.mark.parametrize("output, fragment", [
    (".", "is the config's folder"),
    ("..", "contains the config's folder"),
    ("data", "is the source folder"),
    ("data/out", "lies inside the source folder"),
    ("thesis", "already exists and is not an mlmix build output"),
    ("notes.txt", "already exists and is not an mlmix build output (found a file of 9 bytes)"),
])
def test_build_refuses_an_output_that_is_not_its_own(tmp_path, tokenizer, capsys, output, fragment):
    root = tmp_path / "proj"
    cfg = project(str(root), tokenizer, output=output)
    before = tree(tmp_path)
    rc, err = run_cli(capsys, "build", cfg)
    assert rc == 1
    assert fragment in err and "output" in err
    assert tree(tmp_path) == before


def test_build_refuses_an_empty_output_and_a_link(tmp_path, tokenizer, capsys):
    root = tmp_path / "proj"
    cfg = project(str(root), tokenizer, output="")
    before = tree(tmp_path)
    rc, err = run_cli(capsys, "build", cfg)
    assert rc == 1 and "output: expected a path" in err and tree(tmp_path) == before
    os.symlink("thesis", root / "link")
    cfg = project(str(root), tokenizer, output="link")
    before = tree(tmp_path)
    rc, err = run_cli(capsys, "build", cfg)
    assert rc == 1 and "a symbolic link to 'thesis'" in err and tree(tmp_path) == before


@pytest.mark.parametrize("cache_dir, fragment", [
    (".", "is the config's folder"),
    ("thesis", "already exists and is not an mlmix stage cache"),
    ("runs/a", "is cache_dir"),
    ("runs/a/c", "contains cache_dir"),
])
def test_build_refuses_a_cache_dir_that_is_not_its_own(tmp_path, tokenizer, capsys, cache_dir, fragment):
    root = tmp_path / "proj"
    os.makedirs(root / "thesis" / "read" / "0123456789abcdef01234567")  # looks like a cache entry's folder
    cfg = project(str(root), tokenizer, top=f"cache_dir = {json.dumps(cache_dir)}")
    before = tree(tmp_path)
    rc, err = run_cli(capsys, "build", cfg)
    assert rc == 1 and fragment in err
    assert tree(tmp_path) == before


def test_build_replaces_its_own_output_and_an_empty_folder(tmp_path, tokenizer, capsys):
    root = tmp_path / "proj"
    os.makedirs(root / "runs" / "a")  # made empty by the user beforehand
    cfg = project(str(root), tokenizer)
    user = tree(root, skip=("runs",))
    assert run_cli(capsys, "build", cfg)[0] == 0
    first = mlmix.open(root / "runs" / "a" / "store")
    assert _outputs.kind_of(root / "runs" / "a") == "build" and len(first) > 0
    with open(cfg) as f:
        text = f.read()
    with open(cfg, "w") as f:
        f.write(text.replace("seq_len = 256", "seq_len = 512"))
    assert run_cli(capsys, "build", cfg)[0] == 0
    assert mlmix.open(root / "runs" / "a" / "store").seq_len == 512
    assert tree(root, skip=("runs",)) == dict(user, **{"config.toml": tree(root)["config.toml"]})


def test_an_output_written_before_markers_is_still_replaced(tmp_path, tokenizer, capsys):
    root = tmp_path / "proj"
    cfg = project(str(root), tokenizer)
    assert run_cli(capsys, "build", cfg)[0] == 0
    os.unlink(root / "runs" / "a" / _outputs.MARKER)  # as an older mlmix left it: build.json + store/
    assert _outputs.kind_of(root / "runs" / "a") == "build"
    assert run_cli(capsys, "build", cfg)[0] == 0
    assert os.path.isfile(root / "runs" / "a" / _outputs.MARKER)


def test_a_demo_output_written_before_markers_is_reused(tmp_path):
    """`mlmix demo` reruns into the folder an older mlmix wrote (its demo.json), but not into a look-alike."""
    old = tmp_path / "mlmix-demo"
    old.mkdir()
    (old / "demo.json").write_text(json.dumps({"seed": 0, "heldout": {"english_only": {"en": 4.0}}}))
    (old / "report.html").write_text("<html></html>")
    assert _outputs.kind_of(old) == "demo"
    assert _outputs.claim_directory(old, "demo") == str(old)
    assert _outputs.read_marker(str(old))["mlmix"] == "demo"
    other = tmp_path / "other"
    other.mkdir()
    (other / "demo.json").write_text('{"my": "notes"}')
    with pytest.raises(_outputs.OutputError, match="not an mlmix demo output"):
        _outputs.claim_directory(other, "demo")


def test_python_writers_refuse_user_paths(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("x")
    (tmp_path / "file.json").write_text('{"mine": 1}')
    tokens = mlmix.Ragged.from_lengths(np.arange(40, dtype=np.uint32), [10, 10, 20])
    before = tree(tmp_path)
    with pytest.raises(_outputs.OutputError, match=r"path: .*user' already exists and is not an mlmix packed store"):
        mlmix.write_store(user, tokens, seq_len=32)
    with pytest.raises(_outputs.OutputError, match="not an mlmix packed store"):
        mlmix.write_store(tmp_path / "file.json", tokens, seq_len=32)
    with pytest.raises(_outputs.OutputError, match="not a Ragged array saved by mlmix"):
        tokens.save(user)
    mix = mlmix.recipes.pinch([{"id": str(i), "lang": lang} for i in range(20) for lang in ("en", "ru")],
                              n_multilingual=2, languages=["en", "ru"], seed=0)
    with pytest.raises(_outputs.OutputError, match="not a mixture manifest written by mlmix"):
        mix.save(tmp_path / "file.json")
    assert tree(tmp_path) == before
    # their own outputs are replaced
    mlmix.write_store(tmp_path / "s", tokens, seq_len=32)
    mlmix.write_store(tmp_path / "s", tokens, seq_len=64)
    assert mlmix.open(tmp_path / "s").seq_len == 64
    mix.save(tmp_path / "m.json")
    mix.save(tmp_path / "m.json")
    with pytest.raises(_outputs.OutputError, match="lies inside an mlmix packed store"):
        tokens.save(tmp_path / "s" / "extra")


def test_report_never_overwrites_a_file_it_did_not_write(tmp_path, tokenizer, capsys):
    root = tmp_path / "proj"
    cfg = project(str(root), tokenizer)
    assert run_cli(capsys, "build", cfg)[0] == 0
    out = root / "runs" / "a"
    before = tree(tmp_path)
    for target in (out / "store" / "manifest.json", out / "store" / "new.html", out / "build.json", root / "notes.txt",
                   root / "thesis"):
        rc, err = run_cli(capsys, "report", str(out), "-o", str(target))
        assert rc == 1 and str(target) in err, err
        assert tree(tmp_path) == before
    # a report it wrote is replaced; so is the output's own
    assert run_cli(capsys, "report", str(out), "-o", str(root / "r.html"))[0] == 0
    assert run_cli(capsys, "report", str(out), "-o", str(root / "r.html"))[0] == 0
    assert run_cli(capsys, "report", str(out))[0] == 0
    assert _outputs.check_sealed(str(out)) == []  # the report written into the output is sealed with it


def test_demo_and_eval_refuse_a_user_folder(tmp_path, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "results.json").write_text("my results")
    before = tree(tmp_path)
    rc, err = run_cli(capsys, "demo", "--out", str(user))
    assert rc == 1 and "out: " in err and "not an mlmix demo output" in err
    from mlmix.eval import run as eval_run

    with pytest.raises(_outputs.OutputError, match="not an mlmix eval output"):
        eval_run({"output": str(user), "models": [{"name": "m", "path": str(tmp_path / "nomodel")}]})
    assert tree(tmp_path) == before


# ---- sources are exactly what the config names ---------------------------------------------------
def test_a_recursive_glob_at_the_config_root_never_reads_outputs(tmp_path, tokenizer, capsys):
    root = tmp_path / "proj"
    cfg = project(str(root), tokenizer, source="**/*.jsonl")
    counts = []
    for _ in range(3):
        assert run_cli(capsys, "build", cfg)[0] == 0
        with open(root / "runs" / "a" / "build.json") as f:
            counts.append(json.load(f)["stages"]["read"]["records"])
    assert counts == [len(parallel_rows(2))] * 3
    # a leftover temporary sibling of a killed writer is not read either
    os.makedirs(root / "runs" / ".a.tmp-deadbeef-1-x")
    write_jsonl(str(root / "runs" / ".a.tmp-deadbeef-1-x" / "records.jsonl"), parallel_rows(1))
    assert run_cli(capsys, "build", cfg)[0] == 0
    with open(root / "runs" / "a" / "build.json") as f:
        assert json.load(f)["stages"]["read"]["records"] == counts[0]


def test_the_config_folder_is_literal(tmp_path, tokenizer, capsys):
    """A config in proj[1]/ reads proj[1]/data, never proj1/data (which the glob proj[1] matches)."""
    for name, n in (("proj[1]", 2), ("proj1", 1)):
        project(str(tmp_path / name), tokenizer, source="data/*.jsonl")
        write_jsonl(str(tmp_path / name / "data" / "en.jsonl"), parallel_rows(n)[:n * 3])
    cfg = str(tmp_path / "proj[1]" / "config.toml")
    assert run_cli(capsys, "build", cfg)[0] == 0
    with open(tmp_path / "proj[1]" / "runs" / "a" / "build.json") as f:
        read = json.load(f)["stages"]["read"]["records"]
    assert read == 6 + len([r for r in parallel_rows(2) if r["lang"] != "en"])


def test_a_literal_name_with_pattern_characters_and_its_escape(tmp_path, tokenizer, capsys):
    root = tmp_path / "proj"
    project(str(root), tokenizer)
    os.rename(root / "data" / "en.jsonl", root / "data" / "en[v2].jsonl")
    cfg = project(str(root), tokenizer, source="data/en[v2].jsonl")
    os.unlink(root / "data" / "en.jsonl")  # project() rewrote it; only the bracketed name remains
    assert run_cli(capsys, "build", cfg)[0] == 0
    n_en = len([r for r in parallel_rows(2) if r["lang"] == "en"])
    with open(root / "runs" / "a" / "build.json") as f:
        assert json.load(f)["stages"]["read"]["records"] == n_en
    # inside a pattern, a bracket is matched literally by enclosing it in brackets
    cfg = project(str(root), tokenizer, source="data/en[[]v2]*")
    os.unlink(root / "data" / "en.jsonl")
    assert run_cli(capsys, "build", cfg)[0] == 0
    with open(root / "runs" / "a" / "build.json") as f:
        assert json.load(f)["stages"]["read"]["records"] == n_en


def test_links_and_loops_are_read_once(tmp_path, tokenizer, capsys):
    root = tmp_path / "proj"
    cfg = project(str(root), tokenizer, source="**/*.jsonl")
    os.makedirs(root / "data" / "sub")
    os.symlink("..", root / "data" / "sub" / "up")  # a loop
    os.symlink("../..", root / "data" / "sub" / "top")  # another, through the project root
    os.symlink("en.jsonl", root / "data" / "en-again.jsonl")  # the same file twice
    before = tree(root)
    assert run_cli(capsys, "build", cfg)[0] == 0
    with open(root / "runs" / "a" / "build.json") as f:
        assert json.load(f)["stages"]["read"]["records"] == len(parallel_rows(2))
    # a directory source walks the same way
    cfg = project(str(root), tokenizer, source="data")
    assert run_cli(capsys, "build", cfg)[0] == 0
    with open(root / "runs" / "a" / "build.json") as f:
        assert json.load(f)["stages"]["read"]["records"] == len(parallel_rows(2))
    after = tree(root, skip=("runs",))
    assert {k: v for k, v in after.items() if k != "config.toml"} == \
        {k: v for k, v in before.items() if k != "config.toml"}


def test_hidden_files_and_outputs_inside_a_directory_source_are_skipped(tmp_path, tokenizer, capsys):
    root = tmp_path / "proj"
    cfg = project(str(root), tokenizer, source="data")
    write_jsonl(str(root / "data" / ".draft.jsonl"), parallel_rows(1))
    assert run_cli(capsys, "build", cfg)[0] == 0
    with open(root / "runs" / "a" / "build.json") as f:
        assert json.load(f)["stages"]["read"]["records"] == len(parallel_rows(2))


# ---- a cached result is trusted only as far as it is checked -------------------------------------
def test_a_changed_output_file_is_detected_and_rebuilt(tmp_path, tokenizer, capsys):
    root = tmp_path / "proj"
    cfg = project(str(root), tokenizer, extra='[mixture]\nrecipe = "pinch"\nn_multilingual = 3\npivot = "en"\nlanguages = ["en", "de", "fr", "ru"]')
    assert run_cli(capsys, "build", cfg)[0] == 0
    out = root / "runs" / "a"
    good = tree(out)
    for name, damage in (("lengths.npy", lambda p: np.save(p, np.zeros(3, np.int32))),
                         ("langs.json", lambda p: _write_text(p, '["en"]')),
                         ("mixture.json", os.unlink)):
        damage(str(out / name))
        for cmd in ("inspect", "report"):
            rc, err = run_cli(capsys, cmd, str(out))
            assert rc == 1 and name in err and "rebuild" in err, err
        rc, err = run_cli(capsys, "build", cfg)
        assert rc == 0 and f"{name} " in err and "rebuilding it" in err
        volatile = (_outputs.MARKER, "timings.json")  # how long each stage took differs from run to run
        assert {k: v for k, v in tree(out).items() if k not in volatile} == \
            {k: v for k, v in good.items() if k not in volatile}


def test_the_report_setting_is_followed_on_a_cached_output(tmp_path, tokenizer, capsys):
    root = tmp_path / "proj"
    cfg = project(str(root), tokenizer)
    out = root / "runs" / "a"
    assert run_cli(capsys, "build", cfg)[0] == 0
    assert not os.path.exists(out / "report.html")
    with open(cfg) as f:
        text = f.read()
    with open(cfg, "w") as f:
        f.write(text.replace("report = false", "report = true"))
    assert run_cli(capsys, "build", cfg)[0] == 0
    assert os.path.isfile(out / "report.html") and _outputs.check_sealed(str(out)) == []
    with open(cfg, "w") as f:
        f.write(text)
    assert run_cli(capsys, "build", cfg)[0] == 0
    assert not os.path.exists(out / "report.html") and _outputs.check_sealed(str(out)) == []


@pytest.mark.parametrize("name, text", [("build.json", "{not json"), ("build.json", "[1, 2]"),
                                         ("build.json", '{"stages": {}, "config": {}}'),
                                         ("tokenizer.json", '{"model": 3}')])
def test_inspect_and_report_on_a_malformed_output_say_which_file(tmp_path, tokenizer, capsys, name, text):
    root = tmp_path / "proj"
    cfg = project(str(root), tokenizer)
    assert run_cli(capsys, "build", cfg)[0] == 0
    out = root / "runs" / "a"
    with open(out / name, "w") as f:
        f.write(text)
    os.unlink(out / _outputs.MARKER)  # as if from an older mlmix: no checksums to catch it first
    for cmd in ("inspect", "report"):
        rc, err = run_cli(capsys, cmd, str(out))
        assert rc == 1 and name in err and "Traceback" not in err, err


def test_a_downloaded_parquet_dataset_folder_builds_and_stays_untouched(tmp_path, tokenizer, capsys):
    """A dataset folder as the hub ships it (train/test shards of ShareGPT rows without ids, a README, a
    .gitattributes, huggingface_hub's hidden .cache with its own copy), read with the source settings left at
    their defaults, by directory and by glob; the folder is byte for byte the same afterwards. A shard that is a
    Git LFS pointer (a clone without git-lfs) is a clear error naming it."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "proj"
    data = root / "data"
    rows = [{"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["response"]}],
             "language": r["lang"]} for r in parallel_rows(2)]
    os.makedirs(data / ".cache" / "huggingface")
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), data / "train-00000-of-00002.parquet", row_group_size=7)
    pq.write_table(pa.Table.from_pylist(rows[half:]), data / "train-00001-of-00002.parquet", row_group_size=7)
    pq.write_table(pa.Table.from_pylist(rows[:3]), data / ".cache" / "huggingface" / "train.parquet")
    _write_text(str(data / "README.md"), "---\nlicense: mit\n---\n# a dataset\n")
    _write_text(str(data / ".gitattributes"), "*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    before = tree(root)
    # the folder also holds the project's own en/ru JSON lines (as many rows again); the hidden .cache is skipped
    for source, records in (("data", 2 * len(rows)), ("data/train-*.parquet", len(rows))):
        cfg = project(str(root), tokenizer, source=source)
        before = tree(root, skip=("runs",))
        rc, err = run_cli(capsys, "build", cfg)
        assert rc == 0, err
        with open(root / "runs" / "a" / "build.json") as f:
            assert json.load(f)["stages"]["read"]["records"] == records
        assert tree(root, skip=("runs",)) == before
    _write_text(str(data / "train-00001-of-00002.parquet"),
                "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 12345\n")
    before = tree(root, skip=("runs",))
    rc, err = run_cli(capsys, "build", cfg)
    assert rc == 1 and "train-00001-of-00002.parquet: not a readable Parquet file" in err, err
    assert tree(root, skip=("runs",)) == before


def test_a_where_filter_in_the_config_reads_as_the_python_filter(tmp_path, tokenizer, capsys):
    """A user's config filtering a folder of JSON lines and Parquet (`where = {lang = "ru", reviewed = true}`), the
    rest of the source settings at their defaults: the build keeps exactly the rows Python's filter keeps (the C++
    reader and the Arrow columns decide it), and the folder is byte for byte the same afterwards."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from mlmix import readers
    from mlmix.config import load_config

    root = tmp_path / "proj"
    project(str(root), tokenizer)  # data/en.jsonl, data/ru.jsonl
    rows = [dict(r, reviewed=[True, False, None, 1][i % 4]) for i, r in enumerate(parallel_rows(3))]
    pq.write_table(pa.Table.from_pylist([dict(r, reviewed=r["reviewed"] if r["reviewed"] != 1 else True)
                                         for r in rows]), root / "data" / "more.parquet", row_group_size=5)
    write_jsonl(str(root / "data" / "more.jsonl"), rows)  # 1 (an int) == True in Python's filter
    cfg = root / "config.toml"
    text = cfg.read_text().replace('path = "data"\n', 'path = "data"\nwhere = {lang = "ru", reviewed = true}\n')
    assert "where" in text
    cfg.write_text(text)
    before = tree(root)
    rc, err = run_cli(capsys, "build", str(cfg))
    assert rc == 0, err
    src = load_config(str(cfg))["sources"][0]
    want = sum(1 for _ in readers.iter_source(src))
    assert want > 0 and want < 2 * len(rows)
    with open(root / "runs" / "a" / "build.json") as f:
        assert json.load(f)["stages"]["read"]["records"] == want
    assert tree(root, skip=("runs",)) == {k: v for k, v in before.items() if not k.startswith("runs")}
