"""README.md's tour as a newcomer runs it: every shell command and every Python block of "A five-minute
tour", extracted from README.md at test time and run verbatim in a fresh directory that holds what a clone
holds (README.md, examples/, the bundled demo data), after the README's own `mlmix demo`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOUR = "## A five-minute tour"


def _readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def _tour(text: str) -> str:
    start = text.index(TOUR)
    end = text.find("\n## ", start + len(TOUR))
    return text[start:end if end >= 0 else len(text)]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _commands(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _env() -> dict:
    env = dict(os.environ)
    # the mlmix of this interpreter's environment (a virtualenv's bin/, as after `pip install`)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)  # the tour's Ray line starts a local cluster
    return env


def _run(cmd: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"README command failed ({res.returncode}): {cmd}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh directory with what a clone has that the tour reads, after the README's `mlmix demo`."""
    d = tmp_path_factory.mktemp("tour")
    shutil.copy(REPO / "README.md", d / "README.md")
    shutil.copytree(REPO / "examples", d / "examples")
    shutil.copytree(REPO / "python" / "mlmix" / "data" / "demo", d / "python" / "mlmix" / "data" / "demo")
    setup = _blocks(_readme(), "bash")[0].strip()
    demo = setup.split("&&")[-1].strip()  # the first block: install, then run the demo
    assert demo.startswith("mlmix demo"), setup
    assert "`mlmix demo`" in _tour(_readme()), "the tour should say that it follows the demo"
    res = _run(demo, d)
    assert "models:" in res.stdout and (d / "mlmix-demo" / "models" / "pinch" / "config.json").is_file()
    return d


def test_tour_shell_commands_run_as_written(clone):
    blocks = _blocks(_tour(_readme()), "bash")
    assert blocks, "the tour has no shell block"
    commands = [c for b in blocks for c in _commands(b)]
    assert any(c.startswith("mlmix eval") for c in commands) and any("--engine ray" in c for c in commands)
    outputs = {}
    for cmd in commands:
        outputs[cmd] = _run(cmd, clone)

    build = next(c for c in commands if c.startswith("mlmix build") and "--engine" not in c)
    assert (clone / "runs" / "pinch" / "report.html").is_file(), outputs[build].stdout
    inspect = next(c for c in commands if c.startswith("mlmix inspect"))
    text = outputs[inspect].stdout
    assert "mixture    pinch(n_multilingual=11, pivot=en), seed 0" in text
    assert "<|endoftext|>" not in text  # padding is one marker, never examples of pad tokens
    assert re.search(r"\[\d[\d,]* pad tokens?\]", text)

    # the evaluation scored both of the demo's models in every language and says what a judge would add
    ev = next(c for c in commands if c.startswith("mlmix eval"))
    out = " ".join(outputs[ev].stdout.split())
    assert "== english_only" in out and "== pinch" in out
    assert "not measured: judge:" in out and "[judge]" in out and 'kind = "http"' in out
    results = json.loads((clone / "runs" / "eval" / "results.json").read_text())
    assert set(results["loss"]) == {"english_only", "pinch"} and "judge" not in results
    for name in ("english_only", "pinch"):
        assert all(v["n"] == 16 for v in results["loss"][name]["languages"].values())
        assert len(results["loss"][name]["languages"]) == 12
    assert "judge" in results["absent"]

    # every file the tour's commands wrote has the same, umask-derived mode
    umask = os.umask(0)
    os.umask(umask)
    modes = {}
    for top in ("mlmix-demo", "runs"):
        for base, _, files in os.walk(clone / top):
            for f in files:
                modes[os.path.relpath(os.path.join(base, f), clone)] = os.stat(os.path.join(base, f)).st_mode & 0o777
    odd = {p: oct(m) for p, m in modes.items() if m != 0o666 & ~umask}
    assert not odd, f"files not written with mode {oct(0o666 & ~umask)}: {odd}"


def test_tour_python_blocks_run_as_written(tmp_path):
    blocks = _blocks(_tour(_readme()), "python")
    assert len(blocks) >= 2
    script = tmp_path / "tour.py"
    script.write_text("\n".join(blocks), encoding="utf-8")  # one session, as a reader pastes them in turn
    work = tmp_path / "work"
    work.mkdir()
    res = subprocess.run([sys.executable, str(script)], cwd=work, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    assert (work / "store" / "manifest.json").is_file()
