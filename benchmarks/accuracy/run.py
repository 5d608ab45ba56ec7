"""python benchmarks/accuracy/run.py --preset smoke|quick|full [--out DIR] [--samples N] [--fresh]"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accuracy.runner import PRESETS, RESULTS, run  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--samples", type=int, help="samples per task and context (overrides the preset)")
    ap.add_argument("--fresh", action="store_true", help="start over instead of resuming the preset's JSONL")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.samples:
        preset = replace(preset, models=tuple((m, c, args.samples) for m, c, _ in preset.models))
    if args.fresh:
        (args.out / f"accuracy_{preset.name}.jsonl").unlink(missing_ok=True)
    path = run(preset, args.out)
    for r in __import__("json").loads(path.read_text()):
        print(f"{r['model']:28s} {r['context']:6d} {r['task']:10s} {r['mode']:18s} {str(r['budget']):>6s} "
              f"n={r['n']:3d} acc={r['accuracy']:.2f} [{r['ci95_low']:.2f}, {r['ci95_high']:.2f}]")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
