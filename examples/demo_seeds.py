"""The demo's trade-off over several seeds: how much the pinch changes held-out loss per language, with the
seed-to-seed spread (one seed is one draw: the mixture's choice of translations, the model's initialisation and
the batch order all change with it).

    python examples/demo_seeds.py                 # seeds 0-7, about 30-100 s each on 2 cores
    python examples/demo_seeds.py --seeds 3 --steps 40 --out demo-seeds --json summary.json

Each seed runs ``mlmix demo --seed S`` (into OUT/seed-S) and the table gives, per language, the change in
held-out loss (pinch minus English-only, nats per trained token; negative: the pinch is better): mean, sample
standard deviation, range, and in how many seeds the pinch was better.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: the demo's)")
    parser.add_argument("--out", default="demo-seeds", help="parent of the per-seed demo outputs (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the per-seed changes and the summary here")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"--seeds must be >= 2 to measure a spread, got {args.seeds}")

    from mlmix import demo

    changes: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        print(f"seed {seed} ...", file=sys.stderr, flush=True)
        res = demo.run(os.path.join(args.out, f"seed-{seed}"), seed=seed, quiet=True,
                       **({"steps": args.steps} if args.steps else {}))
        for lang, pinch in res["heldout"]["pinch"].items():
            changes.setdefault(lang, []).append(pinch - res["heldout"]["english_only"][lang])

    summary = {}
    print(f"held-out loss change, pinch minus English-only (nats/token), {args.seeds} seeds:")
    print(f"  {'lang':<6}{'mean':>8}{'sd':>8}{'min':>9}{'max':>9}  pinch better")
    for lang, xs in changes.items():
        s = {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs), "min": min(xs), "max": max(xs),
             "better": sum(x < 0 for x in xs), "seeds": len(xs)}
        summary[lang] = s
        print(f"  {lang:<6}{s['mean']:>+8.2f}{s['sd']:>8.2f}{s['min']:>+9.2f}{s['max']:>+9.2f}  "
              f"{s['better']}/{s['seeds']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"changes": changes, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
