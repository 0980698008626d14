"""The ``mlmix`` command line: ``mlmix demo | build CONFIG | inspect STORE | report STORE | eval``."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import mlmix

    info = mlmix.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>22}: {v}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlmix",
        description="Language-balanced sampling, dedup, tokenization and packing for multilingual instruction tuning.",
    )
    parser.add_argument("--version", action="version", version=f"mlmix {__import__('mlmix').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group()
        g.add_argument("-q", "--quiet", action="store_true", help="print only errors and the final summary")
        g.add_argument("-v", "--verbose", action="store_true", help="print more detail")
        p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout")

    p = sub.add_parser("info", help="what this installation was built with")
    common(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="run the embedded end-to-end demo on bundled data")
    common(p)
    p.add_argument("--out", default="mlmix-demo", help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"mlmix: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
