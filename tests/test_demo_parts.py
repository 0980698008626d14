"""Pieces of ``mlmix demo`` that run without training a model: the modes of what it writes, its report section."""

from __future__ import annotations

import os
import stat

from mlmix._atomic import relax_modes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_relax_modes_gives_the_tree_umask_derived_modes(tmp_path):
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    for path, mode in ((root / "weights.safetensors", 0o600), (root / "sub" / "config.json", 0o640)):
        path.write_text("x")
        os.chmod(path, mode)  # what safetensors and mkstemp leave
    os.chmod(root / "sub", 0o700)  # what mkdtemp leaves
    relax_modes(str(root))
    mask = _umask()
    modes = {os.path.relpath(os.path.join(b, n), root): stat.S_IMODE(os.stat(os.path.join(b, n)).st_mode)
             for b, ds, fs in os.walk(root) for n in ds + fs}
    assert modes == {"sub": 0o777 & ~mask, "weights.safetensors": 0o666 & ~mask,
                     os.path.join("sub", "config.json"): 0o666 & ~mask}
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o777 & ~mask


def test_demo_section_escapes_what_it_shows():
    from mlmix.demo import TRAINED, _demo_section

    langs = ["en", "sw"]
    result = {"params": 1234, "steps": 2, "seed": 0, "loader": "a <loader>", "loss": "loss & co",
              "train_loss": {name: [3.0, 2.5] for name in TRAINED},
              "heldout": {"english_only": {"en": 2.0, "sw": 3.0}, "pinch": {"en": 2.1, "sw": 2.5}}}
    html = _demo_section(result)
    assert "a &lt;loader&gt;" in html and "loss &amp; co" in html
    assert "<table>" in html and "<td>sw</td><td>3.000</td><td>2.500</td><td>-0.500</td>" in html
    assert all(f"<td>{lang}</td>" in html for lang in langs)
