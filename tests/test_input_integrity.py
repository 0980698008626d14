"""mlmix never silently misreads its input.

Three classes of failure, each tried on the readers directly and through ``mlmix.build``:

- input is read whole or the build fails naming the file (and the line, byte offset or row group): truncated
  or corrupt gzip, zstd (one frame or several) and Parquet, a JSON line cut short or nested too deep;
- a record-level error in a later stage (tokenize) names the record's file and line, not an index into a chunk;
- fallback ids (rows without an id field) never collide across sources, so recipes never pair unrelated
  records as translations.

Every damaged file is written by the test itself; a failed build leaves no output directory.
"""

from __future__ import annotations

import gzip
import json
import os

import pytest

import mlmix
from mlmix import readers
from mlmix.config import validate_config
from pipeline_data import train_tiny_bpe, write_jsonl

zstandard = pytest.importorskip("zstandard")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_tiny_bpe(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(start, start + n)]


def _jsonl_bytes(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _src(path, **kw) -> dict:
    cfg = {"output": "o", "tokenizer": {"name": "qwen"}, "sources": [{"path": str(path), **kw}]}
    return validate_config(cfg)["sources"][0]


def _read(path, **kw) -> list[dict]:
    return list(readers.iter_source(_src(path, **kw)))


def _config(tmp_path, tok_path, sources, **kw) -> dict:
    cfg = {
        "output": str(tmp_path / "out"),
        "sources": sources,
        "tokenizer": {"path": tok_path, "template": "chatml"},
        "langid": {"backend": "none"},
        "dedup": {"exact": False, "near": False},
        "pack": {"seq_len": 64, "overlong": "truncate"},
        "report": False,
    }
    cfg.update(kw)
    return cfg


def _build_fails(tmp_path, tok_path, path, match, **src) -> ValueError:
    """Build a one-source config on ``path``: it must raise ValueError matching ``match`` and write no output."""
    cfg = _config(tmp_path, tok_path, [{"path": str(path), "lang": "en", **src}])
    with pytest.raises(ValueError, match=match) as exc:
        mlmix.build(cfg, quiet=True)
    assert not os.path.exists(cfg["output"]), "a failed build left its output behind"
    return exc.value


def _zstd_frames(rows, n_frames: int) -> tuple[bytes, list[int]]:
    """``rows`` as JSON lines compressed into ``n_frames`` zstd frames; also the frames' sizes."""
    c = zstandard.ZstdCompressor()
    per = len(rows) // n_frames
    frames = [c.compress(_jsonl_bytes(rows[k * per:(k + 1) * per if k < n_frames - 1 else len(rows)]))
              for k in range(n_frames)]
    return b"".join(frames), [len(f) for f in frames]


# ---- class 1: read whole, or fail naming the file --------------------------------------------------------
def test_zstd_cut_inside_second_frame_fails_the_build(tmp_path, tok_path):
    data, sizes = _zstd_frames(_rows(200), 2)
    path = tmp_path / "data.jsonl.zst"
    path.write_bytes(data[:sizes[0] + sizes[1] // 2])
    decompressed = len(_jsonl_bytes(_rows(100)))
    _build_fails(tmp_path, tok_path, path, rf"data\.jsonl\.zst: compressed stream is truncated after line 100 "
                                           rf"\(byte offset {decompressed} of the decompressed data\)")


def test_zstd_every_frame_is_read(tmp_path):
    data, _ = _zstd_frames(_rows(300), 3)
    (tmp_path / "data.jsonl.zst").write_bytes(data)
    got = _read(tmp_path / "data.jsonl.zst")
    assert [r["messages"][0]["content"] for r in got] == [f"question {i}" for i in range(300)]


@pytest.mark.parametrize("cut", [1, 7, "header"])
def test_zstd_single_frame_truncated(tmp_path, cut):
    data, _ = _zstd_frames(_rows(50), 1)
    keep = 3 if cut == "header" else len(data) - cut
    (tmp_path / "data.jsonl.zst").write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"data\.jsonl\.zst: compressed stream is truncated"):
        _read(tmp_path / "data.jsonl.zst")


def test_zstd_cut_between_frames_reads_the_whole_frames(tmp_path):
    # a file that ends exactly at a frame boundary is a complete zstd file: its frames are all read
    data, sizes = _zstd_frames(_rows(200), 2)
    (tmp_path / "data.jsonl.zst").write_bytes(data[:sizes[0]])
    assert len(_read(tmp_path / "data.jsonl.zst")) == 100


def test_zstd_corrupt_frame(tmp_path, tok_path):
    data, sizes = _zstd_frames(_rows(200), 2)
    bad = bytearray(data)
    bad[sizes[0] + 20] ^= 0xFF  # inside the second frame's compressed blocks
    path = tmp_path / "data.jsonl.zst"
    path.write_bytes(bytes(bad))
    err = _build_fails(tmp_path, tok_path, path, r"data\.jsonl\.zst: compressed data is corrupt after line 100")
    assert "zstd" in str(err)


def test_zstd_file_that_is_not_zstd(tmp_path):
    (tmp_path / "data.jsonl.zst").write_bytes(_jsonl_bytes(_rows(3)))
    with pytest.raises(ValueError, match=r"data\.jsonl\.zst: compressed data is corrupt before its first line"):
        _read(tmp_path / "data.jsonl.zst")


def test_zstd_trailing_garbage(tmp_path):
    data, _ = _zstd_frames(_rows(20), 1)
    (tmp_path / "data.jsonl.zst").write_bytes(data + b"garbage")
    with pytest.raises(ValueError, match=r"data\.jsonl\.zst: compressed data is corrupt after line 20"):
        _read(tmp_path / "data.jsonl.zst")


def test_gzip_truncated_fails_the_build(tmp_path, tok_path):
    data = gzip.compress(_jsonl_bytes(_rows(2000)))
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    err = _build_fails(tmp_path, tok_path, path, r"data\.jsonl\.gz: compressed stream is truncated after line \d+ "
                                                 r"\(byte offset \d+ of the decompressed data\)")
    assert not isinstance(err, EOFError) and err.__cause__ is None


@pytest.mark.parametrize("keep", [5, 10, -1, -4])
def test_gzip_truncated_anywhere(tmp_path, keep):
    data = gzip.compress(_jsonl_bytes(_rows(30)))
    (tmp_path / "data.jsonl.gz").write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"data\.jsonl\.gz: compressed stream is truncated"):
        _read(tmp_path / "data.jsonl.gz")


def test_gzip_second_member_truncated(tmp_path):
    second = gzip.compress(_jsonl_bytes(_rows(10, 10)))
    (tmp_path / "data.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(_rows(10))) + second[:-12])
    with pytest.raises(ValueError, match=r"data\.jsonl\.gz: compressed stream is truncated"):
        _read(tmp_path / "data.jsonl.gz")


def test_gzip_bad_crc(tmp_path, tok_path):
    data = bytearray(gzip.compress(_jsonl_bytes(_rows(20))))
    data[-6] ^= 0x01  # the CRC-32 in the trailer
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(bytes(data))
    _build_fails(tmp_path, tok_path, path, r"data\.jsonl\.gz: compressed data is corrupt after line 20 .*CRC check failed")


def test_gzip_corrupt_deflate_stream(tmp_path):
    data = bytearray(gzip.compress(_jsonl_bytes(_rows(500))))
    for k in range(40, 60):
        data[k] ^= 0x5A
    (tmp_path / "data.jsonl.gz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"data\.jsonl\.gz: compressed (data is corrupt|stream is truncated)"):
        _read(tmp_path / "data.jsonl.gz")


def test_gzip_file_that_is_not_gzip(tmp_path, tok_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(_jsonl_bytes(_rows(3)))
    _build_fails(tmp_path, tok_path, path, r"data\.jsonl\.gz: compressed data is corrupt before its first line: "
                                           r"Not a gzipped file")


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.jsonl.zst"])
def test_empty_compressed_file_has_no_records(tmp_path, tok_path, name):
    (tmp_path / name).write_bytes(b"")
    assert _read(tmp_path / name) == []
    _build_fails(tmp_path, tok_path, tmp_path / name, r"no records were read")


@pytest.mark.parametrize("name, pack", [("data.jsonl.gz", gzip.compress),
                                        ("data.jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b))])
def test_compressed_empty_content_has_no_records(tmp_path, name, pack):
    (tmp_path / name).write_bytes(pack(b""))
    assert _read(tmp_path / name) == []


def test_uncompressed_file_cut_mid_line(tmp_path, tok_path):
    data = _jsonl_bytes(_rows(10))
    path = tmp_path / "data.jsonl"
    path.write_bytes(data[:-9])  # the last line loses its end and its newline
    _build_fails(tmp_path, tok_path, path, r"data\.jsonl:10: not valid JSON \(.*\); the file ends inside this line "
                                           r"\(no newline after it\): is it truncated\?")


def test_last_line_without_newline_is_read(tmp_path):
    (tmp_path / "data.jsonl").write_bytes(_jsonl_bytes(_rows(3)).rstrip(b"\n"))
    assert len(_read(tmp_path / "data.jsonl")) == 3


@pytest.mark.parametrize("name, pack", [("data.jsonl.gz", gzip.compress),
                                        ("data.jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b))])
def test_compressed_content_cut_mid_line(tmp_path, name, pack):
    # whole compressed stream, but its content was cut before compression
    (tmp_path / name).write_bytes(pack(_jsonl_bytes(_rows(4))[:-9]))
    with pytest.raises(ValueError, match=r"data\.jsonl\.(gz|zst):4: not valid JSON .*is it truncated\?"):
        _read(tmp_path / name)


def test_json_line_nested_200k_deep(tmp_path, tok_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(_jsonl_bytes(_rows(2)) + b"[" * 200_000 + b"]" * 200_000 + b"\n")
    err = _build_fails(tmp_path, tok_path, path, r"data\.jsonl:3: JSON nested deeper than 512 levels \(200000 levels\)")
    assert not isinstance(err, RecursionError)


@pytest.mark.parametrize("depth, ok", [(100, True), (512, True), (513, False), (5000, False)])
def test_json_nesting_limit_inside_a_record(tmp_path, depth, ok):
    line = ('{"prompt": "p", "response": "r", "meta": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}\n").encode()
    (tmp_path / "data.jsonl").write_bytes(line)
    if ok:
        assert len(_read(tmp_path / "data.jsonl")) == 1
    else:
        with pytest.raises(ValueError, match=rf"data\.jsonl:1: JSON nested deeper than 512 levels \({depth} levels\)"):
            _read(tmp_path / "data.jsonl")


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "[" * 5000 + '\\"{' * 100, "response": "]" * 5000}) + "\n")
    assert len(_read(tmp_path / "data.jsonl")) == 1


def test_nesting_within_the_limit_but_past_a_lowered_recursion_limit(tmp_path):
    import sys

    (tmp_path / "data.jsonl").write_text('{"prompt": "p", "response": "r", "m": ' + "[" * 400 + "]" * 400 + "}\n")
    it = readers.iter_source(_src(tmp_path / "data.jsonl"))
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(200)
    try:
        with pytest.raises(ValueError, match=r"data\.jsonl:1: JSON nested deeper than Python's recursion limit"):
            next(it)
    finally:
        sys.setrecursionlimit(old)


def _parquet(path, n: int = 5000, **kw) -> bytes:
    pq.write_table(pa.Table.from_pylist(_rows(n)), path, row_group_size=1000, **kw)
    return path.read_bytes()


def test_parquet_truncated(tmp_path, tok_path):
    path = tmp_path / "data.parquet"
    data = _parquet(path)
    path.write_bytes(data[: len(data) // 2])
    _build_fails(tmp_path, tok_path, path, r"data\.parquet: not a readable Parquet file \(damaged, truncated or "
                                           r"another format\)")


def test_parquet_corrupt_footer(tmp_path):
    path = tmp_path / "data.parquet"
    data = bytearray(_parquet(path))
    footer_len = int.from_bytes(data[-8:-4], "little")
    for k in range(len(data) - 8 - footer_len, len(data) - 8, 3):
        data[k] ^= 0xA5
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"data\.parquet: "):
        _read(path)


@pytest.mark.parametrize("content", [b"", b"PAR1", b"not parquet at all\n" * 50, _jsonl_bytes(_rows(5))])
def test_parquet_file_that_is_not_parquet(tmp_path, content):
    (tmp_path / "data.parquet").write_bytes(content)
    with pytest.raises(ValueError, match=r"data\.parquet: not a readable Parquet file"):
        _read(tmp_path / "data.parquet")


def test_parquet_damaged_row_group_is_named(tmp_path, tok_path):
    path = tmp_path / "data.parquet"
    data = bytearray(_parquet(path, compression="none", write_page_checksum=True))
    pf = pq.ParquetFile(path)
    col = pf.metadata.row_group(2).column(0)
    mid = col.data_page_offset + col.total_compressed_size // 2
    data[mid] ^= 0xFF  # one byte of row group 2's first column; its page checksum no longer matches
    path.write_bytes(bytes(data))
    _build_fails(tmp_path, tok_path, path, r"data\.parquet: row group 2 \(rows 2000 to 2999\) cannot be read")


def test_parquet_intact_reads_every_row(tmp_path):
    path = tmp_path / "data.parquet"
    _parquet(path)
    got = _read(path)
    assert len(got) == 5000 and got[4321]["where"].endswith("data.parquet[row 4321]")


# ---- class 2: record-level errors name the file and line -------------------------------------------------
def test_tool_role_at_line_5001_is_reported_at_its_line(tmp_path, tok_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5000)]
    rows.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "calling"},
                              {"role": "tool", "content": "42"}, {"role": "assistant", "content": "a"}]})
    path = write_jsonl(str(tmp_path / "en.jsonl"), rows)
    err = _build_fails(tmp_path, tok_path, path, r"en\.jsonl:5001: messages\[2\] has unknown role 'tool'")
    assert "record 904" not in str(err) and "record " not in str(err)


def test_record_where_is_kept(tmp_path):
    write_jsonl(str(tmp_path / "a.jsonl"), _rows(2))
    assert [r["where"] for r in _read(tmp_path / "a.jsonl")] == [f"{tmp_path / 'a.jsonl'}:{i}" for i in (1, 2)]


def test_tokenizer_errors_use_where_else_the_index(tok_path):
    from mlmix.tokenize import RecordError, Tokenizer

    tok = Tokenizer.from_file(tok_path)
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(RecordError, match=r"^record 1: messages\[0\] has unknown role 'wizard'") as exc:
        tok.encode_records([good, bad], template="chatml")
    assert exc.value.index == 1
    with pytest.raises(RecordError, match=r"^data/x\.jsonl:9: messages\[0\] has unknown role") as exc:
        tok.encode_records([good, dict(bad, where="data/x.jsonl:9")], template="chatml")
    assert exc.value.index == 1 and exc.value.kind == "unknown_role"
    # streaming keeps the location (and the index in the whole stream)
    stream = [dict(good, where=f"f.jsonl:{i}") for i in range(10)] + [dict(bad, where="f.jsonl:10")]
    with pytest.raises(RecordError, match=r"^f\.jsonl:10: ") as exc:
        list(tok.encode_records_stream(stream, chunk_size=4, template="chatml"))
    assert exc.value.index == 10
    with pytest.raises(RecordError, match=r"^record 10: "):
        list(tok.encode_records_stream([good] * 10 + [bad], chunk_size=4, template="chatml"))


def test_tokenizer_template_errors_use_where(tok_path):
    from mlmix.tokenize import RecordError, Tokenizer

    tok = Tokenizer.from_file(tok_path)
    template = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
                "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    recs = [{"where": "a.jsonl:1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"where": "a.jsonl:2", "messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "a"}]}]
    with pytest.raises(RecordError, match=r"^a\.jsonl:2: ") as exc:
        tok.encode_records(recs, template=template)
    assert exc.value.index == 1


# ---- class 3: fallback ids never collide -----------------------------------------------------------------
def _two_languages(tmp_path, n: int = 6):
    for lang in ("en", "ru"):
        os.makedirs(tmp_path / lang, exist_ok=True)
        write_jsonl(str(tmp_path / lang / "train.jsonl"),
                    [{"prompt": f"{lang} question {i}", "response": f"{lang} answer {i}"} for i in range(n)])


def test_fallback_ids_are_relative_paths_and_line_numbers(tmp_path, monkeypatch):
    _two_languages(tmp_path)
    cfg = validate_config({"output": "o", "tokenizer": {"name": "qwen"},
                           "sources": [{"path": "en/train.jsonl", "lang": "en"}, {"path": "ru/train.jsonl", "lang": "ru"},
                                       {"path": "ru/train.jsonl", "lang": "ru", "name": "russian"}]},
                          base_dir=str(tmp_path))
    en, ru, named = (list(readers.iter_source(s)) for s in cfg["sources"])
    assert [r["id"] for r in en] == [f"en/train.jsonl:{i}" for i in range(1, 7)]
    assert [r["id"] for r in ru] == [f"ru/train.jsonl:{i}" for i in range(1, 7)]
    assert [r["id"] for r in named] == [f"russian:ru/train.jsonl:{i}" for i in range(1, 7)]


def test_fallback_ids_without_base_dir_use_the_current_directory(tmp_path, monkeypatch):
    _two_languages(tmp_path)
    monkeypatch.chdir(tmp_path)
    src = {k: v for k, v in _src(tmp_path / "en" / "train.jsonl").items() if k != "base_dir"}
    assert [r["id"] for r in readers.iter_source(src)][:2] == ["en/train.jsonl:1", "en/train.jsonl:2"]


def test_fallback_ids_of_a_glob_are_per_file(tmp_path):
    _two_languages(tmp_path)
    got = _read(tmp_path / "*" / "train.jsonl")
    ids = [r["id"] for r in got]
    assert len(set(ids)) == len(ids) == 12
    assert all(i.endswith(("/en/train.jsonl:1", "/ru/train.jsonl:1")) for i in (ids[0], ids[6]))


def test_fallback_ids_of_parquet_are_row_indices(tmp_path):
    pq.write_table(pa.Table.from_pylist(_rows(3)), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(3)), tmp_path / "b.parquet")
    ids = [r["id"] for r in _read(tmp_path / "*.parquet")]
    assert len(set(ids)) == 6 and ids[0].endswith("a.parquet:0") and ids[5].endswith("b.parquet:2")


def test_fallback_ids_skip_nothing_under_where_and_limit(tmp_path):
    # the id is the row's own line, not its position after filtering
    write_jsonl(str(tmp_path / "a.jsonl"), [dict(r, split="test" if i % 2 else "train") for i, r in enumerate(_rows(6))])
    got = _read(tmp_path / "a.jsonl", where={"split": "test"}, limit=2)
    assert [r["id"].rsplit(":", 1)[1] for r in got] == ["2", "4"]


def test_given_ids_are_kept(tmp_path):
    write_jsonl(str(tmp_path / "a.jsonl"), [{"id": "s1", "prompt": "p", "response": "r"}, {"prompt": "p", "response": "r"}])
    assert [r["id"] for r in _read(tmp_path / "a.jsonl")] == ["s1", f"{os.path.relpath(tmp_path / 'a.jsonl')}:2".replace(os.sep, "/")]


@pytest.mark.parametrize("mixture", [
    {"recipe": "pinch", "n_multilingual": 6, "pivot": "en", "languages": ["en", "ru"]},
    {"recipe": "percent_mixture", "percent": 100, "pivot": "en", "languages": ["en", "ru"]},
])
def test_recipes_do_not_pair_sources_without_ids(tmp_path, tok_path, mixture):
    # with colliding ids ("train.jsonl:N" twice), the recipes saw 6 source ids, each "translated" into en and ru,
    # and kept one language of each: 6 examples. Every row is its own source: all 12 are kept.
    _two_languages(tmp_path)
    cfg = _config(tmp_path, tok_path, [{"path": "en/train.jsonl", "lang": "en"}, {"path": "ru/train.jsonl", "lang": "ru"}],
                  output="out", mixture=mixture)
    (tmp_path / "build.json").write_text(json.dumps(cfg))
    summary = mlmix.build(str(tmp_path / "build.json"), quiet=True)
    assert summary["stages"]["mix"]["examples"] == 12
    rows = json.loads((tmp_path / "out" / "mixture.json").read_text())["rows"]
    assert len(rows) == 12 and len({sid for sid, _ in rows}) == 12
    assert all(sid.startswith(f"{lang}/train.jsonl:") for sid, lang in rows)
