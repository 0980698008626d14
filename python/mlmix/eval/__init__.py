"""Evaluation as the study did it, per language: held-out loss and perplexity with bootstrap intervals, the
side-by-side judge protocol (both orders), language fidelity, and generation. See docs/eval.md.

``mlmix eval CONFIG`` runs it from a config; names below are imported lazily (torch, transformers and
matplotlib load only when used).
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "evaluate": "mlmix.eval.runner",
    "run": "mlmix.eval.runner",
    "load_config": "mlmix.eval.runner",
    "main": "mlmix.eval.runner",
    "add_subparser": "mlmix.eval.runner",
    "EvalSet": "mlmix.eval.loss",
    "encode_eval_set": "mlmix.eval.loss",
    "heldout_loss": "mlmix.eval.loss",
    "example_losses": "mlmix.eval.loss",
    "store_loss": "mlmix.eval.loss",
    "side_by_side": "mlmix.eval.judge",
    "score_outcomes": "mlmix.eval.judge",
    "outcome": "mlmix.eval.judge",
    "parse_verdict": "mlmix.eval.judge",
    "JudgeRequest": "mlmix.eval.judge",
    "Verdict": "mlmix.eval.judge",
    "CallableJudge": "mlmix.eval.judge",
    "TransformersJudge": "mlmix.eval.judge",
    "HTTPJudge": "mlmix.eval.judge",
    "JUDGE_PROMPT": "mlmix.eval.judge",
    "language_fidelity": "mlmix.eval.fidelity",
    "generate": "mlmix.eval.generate",
    "format_table": "mlmix.eval.results",
    "to_json": "mlmix.eval.results",
    "chart": "mlmix.eval.results",
    "html_section": "mlmix.eval.results",
    "bootstrap_ci": "mlmix.eval.stats",
    "wilson_ci": "mlmix.eval.stats",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports("mlmix.eval", globals(), _LAZY)
