"""The ``mlmix`` command line: ``mlmix demo | build CONFIG | inspect STORE | report STORE | eval CONFIG |
study [CONFIG] | info``.

Exit codes: 0 success; 1 a user error (bad config, missing file, bad data: one line on stderr naming
what is wrong); 2 bad command-line usage (argparse); 130 interrupted. ``--json`` prints one JSON
document on stdout and nothing else there; logs and progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _cmd_info(args: argparse.Namespace) -> int:
    import mlmix

    info = mlmix.build_info()
    if args.json:
        _print_json(info)
    else:
        width = max((len(k) for k in info), default=0) + 2
        for k, v in info.items():
            print(f"{k.replace('_', ' '):<{width}}{_human(v)}")
    return 0


def _human(v) -> str:
    """A build_info value as a person reads it: lists comma-separated, yes/no, "none" for nothing."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple, set, frozenset)):
        return ", ".join(_human(x) for x in v) or "none"
    if isinstance(v, str):
        v = " ".join(v.split())
        return v.replace(",", ", ") if v.count(",") and " " not in v else (v or "none")
    return "none" if v is None else str(v)


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(args)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def _cmd_build(args: argparse.Namespace) -> int:
    from .engine import build

    progress = False if args.no_progress else None
    if args.engine == "local":
        bad = [flag for flag, v in (("--address", args.address), ("--num-cpus", args.num_cpus)) if v is not None]
        if bad:
            raise ValueError(f"{' and '.join(bad)} only appl{'ies' if len(bad) == 1 else 'y'} with --engine ray")
        kwargs = {"workers": args.workers}
    else:
        if args.workers is not None:
            raise ValueError("--workers only applies with --engine local (on Ray, --num-cpus sizes a local cluster)")
        kwargs = {"address": args.address, "num_cpus": args.num_cpus}
    summary = build(args.config, engine=args.engine, quiet=args.quiet or args.json, verbose=args.verbose,
                    progress=progress, use_cache=not args.no_cache, **kwargs)
    if args.json:
        summary = {k: v for k, v in summary.items() if k != "config"}
        _print_json(summary)
    elif not args.quiet:
        print(f"wrote {summary['store']}: {summary['examples']:,} examples, {summary['tokens']:,} tokens, "
              f"{summary['sequences']:,} sequences ({summary['efficiency']:.2%} full) in {summary['seconds']:.1f}s")
        report = os.path.join(summary["output"], "report.html")
        if os.path.isfile(report):
            print(f"report: {report}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .report import format_inspection, inspect_store

    info = inspect_store(args.store, samples=args.samples, max_tokens=args.max_tokens)
    if args.json:
        _print_json(info)
    else:
        print(format_inspection(info, verbose=args.verbose, quiet=args.quiet))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.store, args.output)
    if args.json:
        _print_json({"report": path})
    elif not args.quiet:
        print(f"report: {path}")
    return 0


def stdout_closed() -> int:
    """The reader of stdout went away (``mlmix inspect --json | head``): stop quietly, as Unix tools do.

    Further output goes to /dev/null so the interpreter's final flush cannot fail again; the exit status
    is 141 (128 + SIGPIPE), what a shell reports for a tool that SIGPIPE ended."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured): nothing to redirect
        pass
    return 141


def build_parser() -> argparse.ArgumentParser:
    import mlmix

    parser = argparse.ArgumentParser(
        prog="mlmix",
        description="Language-balanced sampling, dedup, tokenization and packing for multilingual instruction tuning.",
        epilog="Run 'mlmix COMMAND --help' for a command's options. Start with 'mlmix demo'.",
    )
    parser.add_argument("--version", action="version", version=f"mlmix {mlmix.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group()
        g.add_argument("-q", "--quiet", action="store_true", help="print only errors (and --json output)")
        g.add_argument("-v", "--verbose", action="store_true", help="print more detail")
        p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout")

    p = sub.add_parser("demo", help="the end-to-end demo on the bundled parallel set (under a minute on 2 cores)",
                       description="Build the study's mixtures (English-only, the pinch, P=100) on the bundled "
                                   "12-language parallel instruction set, train a tiny causal LM on two of them and "
                                   "compare held-out loss per language; writes a report.")
    common(p)
    p.add_argument("--out", default="mlmix-demo", help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: the demo's budget)")
    p.set_defaults(func=_cmd_demo)

    from .cache import STAGE_NAMES  # the stages in the order mlmix.engine runs them

    p = sub.add_parser("build", help=f"run the pipeline a config describes: {', '.join(STAGE_NAMES)}",
                       description="Read the sources, identify languages, tokenize with the chat template, remove "
                                   "duplicates, build the mixture and pack into a store, as CONFIG (TOML or YAML; "
                                   "see docs/config.md) says, in that order "
                                   f"({' -> '.join(STAGE_NAMES)}), then write the report. Stages are cached: a rerun "
                                   "redoes only what changed.")
    common(p)
    p.add_argument("config", metavar="CONFIG", help="the build config (.toml, .yaml/.yml or .json)")
    p.add_argument("--no-cache", action="store_true", help="recompute every stage (the cache is refreshed)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress while stages run, only their summary lines (default: bars on a terminal or in a "
                        "notebook, a progress line every 15 s in a log)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="run the stages on this machine (with the stage cache), or on Ray Data (pip install "
                        "'mlmix[ray]'; same output, no stage cache; see docs/ray.md) (default: %(default)s)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="with --engine local: processes that run the stages' per-block work (langid, tokenize, "
                        "dedup keys); same output for any number (default: 1)")
    p.add_argument("--address", default=None,
                   help="with --engine ray: the cluster (host:port, ray://host:port or auto); default RAY_ADDRESS, "
                        "else a local cluster")
    p.add_argument("--num-cpus", type=int, default=None, help="with --engine ray and a local cluster: its CPUs")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("inspect", help="what a built store holds: languages, tokens, efficiency, decoded samples",
                       description="Summarise a packed store: sequences, tokens, packing efficiency, examples and "
                                   "tokens per language, and a few decoded samples with the trained spans marked.")
    common(p)
    p.add_argument("store", metavar="STORE", help="the build's output directory (or its store/ inside)")
    p.add_argument("-n", "--samples", type=int, default=2, help="decoded samples to show (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens shown per sample (default: %(default)s)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("report", help="write the HTML report of a built store",
                       description="Render the build's self-contained HTML report (inline SVG charts).")
    common(p)
    p.add_argument("store", metavar="STORE", help="the build's output directory (or its store/ inside)")
    p.add_argument("-o", "--output", default=None, help="where to write the HTML (default: STORE/report.html)")
    p.set_defaults(func=_cmd_report)

    from .eval import add_subparser as add_eval_subparser

    add_eval_subparser(sub)

    from .study import add_subparser as add_study_subparser

    add_study_subparser(sub)

    p = sub.add_parser("info", help="what this installation was built with")
    common(p)
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return rc
    except BrokenPipeError:
        return stdout_closed()
    except KeyboardInterrupt:
        print("mlmix: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError) as exc:
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        print(f"mlmix {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
