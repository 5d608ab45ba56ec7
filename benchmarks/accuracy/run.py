"""python benchmarks/accuracy/run.py --preset smoke|quick|full [--out DIR] [--samples N] [--parallel N]
    [--contexts N ...] [--tasks T ...] [--fresh]"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--contexts", type=int, nargs="+", help="only these context lengths (results: <preset>-slice)")
    ap.add_argument("--tasks", nargs="+", help="only these tasks (results: <preset>-slice)")
    ap.add_argument("--parallel", type=int, help="requests in flight per mode (overrides the preset)")
    ap.add_argument("--fresh", action="store_true", help="start over instead of resuming the preset's JSONL")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.contexts or args.tasks:  # a slice of the preset (e.g. of "full", to check it on a CPU)
        preset = replace(preset, name=f"{preset.name}-slice", parts=tuple(
            replace(p, contexts=tuple(args.contexts or p.contexts), tasks=tuple(args.tasks or p.tasks))
            for p in preset.parts))
    if args.samples:
        preset = replace(preset, parts=tuple(replace(p, samples=args.samples) for p in preset.parts))
    if args.parallel:
        preset = replace(preset, parallel=args.parallel)
    if args.fresh:
        (args.out / f"accuracy_{preset.name}.jsonl").unlink(missing_ok=True)
    path = run(preset, args.out)
    for r in json.loads(path.read_text()):
        ci = f"[{r['ci95_low']:.2f}, {r['ci95_high']:.2f}]" if r["ci95_low"] is not None else ""
        print(f"{r['model']:28s} {r['context']:6d} {r['task']:16s} {r['mode']:18s} {str(r['budget']):>6s} "
              f"n={r['n']:3d} acc={r['accuracy']:.2f} {ci}")
    targets = json.loads(path.with_name(path.stem + "_targets.json").read_text())
    for k, v in targets.items():
        if isinstance(v, dict):
            print(f"{k:34s} " + " ".join(f"{a}={b:.3f}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
