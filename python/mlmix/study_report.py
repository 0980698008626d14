"""The study's HTML report: a placeholder that writes the results table as plain HTML (replaced by the report
with figures)."""

from __future__ import annotations

import html

__all__ = ["write_report"]


def write_report(results: dict, path: str) -> str:
    """Write a self-contained HTML page for a study's results (the ``mlmix.study/1`` JSON) to ``path``; returns
    ``path``."""
    langs = results["study"]["languages"]
    rows = []
    for a in results["arms"]:
        cells = "".join(
            "<td>" + ("" if a["metrics"].get(lang, {}).get("loss") is None
                      else f"{a['metrics'][lang]['loss']:.3f}") + "</td>" for lang in langs)
        rows.append(f"<tr><td>{html.escape(a['arm'])}</td><td>{a['seed']}</td>{cells}</tr>")
    head = "".join(f"<th>{html.escape(lang)}</th>" for lang in langs)
    text = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><meta name=\"generator\" content=\"mlmix study\">"
            f"<title>mlmix study: {html.escape(results['study']['name'])}</title></head><body>"
            f"<h1>mlmix study: {html.escape(results['study']['name'])}</h1><p>Held-out loss per language.</p>"
            f"<table><tr><th>arm</th><th>seed</th>{head}</tr>{''.join(rows)}</table></body></html>\n")
    from ._atomic import atomic_file

    with atomic_file(path, "w") as f:
        f.write(text)
    return path
