"""benchmarks/gpu/carry_files.py: files split into parts for the GPU machine's transfers and joined there."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("carry_files", ROOT / "benchmarks" / "gpu" / "carry_files.py")
carry_files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carry_files)


def test_files_split_into_calls_within_the_budget_join_back_verified(tmp_path):
    files = []
    for name, n in (("a.whl", 5000), ("b.whl", 1234), ("c.bin", 0)):
        f = tmp_path / name
        f.write_bytes(os.urandom(n))
        files.append(f)
    out = tmp_path / "carry"
    m = carry_files.split(files, out, part_bytes=1000)
    assert [len(e["parts"]) for e in m["files"]] == [5, 2, 0]
    groups = carry_files.calls(out, budget_bytes=2600)
    carried = [p for g in groups for p in g]
    assert sorted(carried) == sorted([str(out / carry_files.MANIFEST)] + [str(out / p) for e in m["files"] for p in e["parts"]])
    assert all(sum(Path(p).stat().st_size for p in g) <= 2600 for g in groups) and len(groups) >= 3
    dest = tmp_path / "joined"
    done = carry_files.join(out, dest)
    assert [f.read_bytes() for f in done] == [f.read_bytes() for f in files]


def test_a_missing_or_damaged_part_is_named_and_nothing_lands(tmp_path):
    f = tmp_path / "x.whl"
    f.write_bytes(os.urandom(3000))
    out = tmp_path / "carry"
    m = carry_files.split([f], out, part_bytes=1000)
    (out / m["files"][0]["parts"][1]).unlink()
    with pytest.raises(SystemExit, match=r"missing parts .*x\.whl\.part01"):
        carry_files.join(out, tmp_path / "joined")
    carry_files.split([f], out, part_bytes=1000)
    (out / m["files"][0]["parts"][2]).write_bytes(b"damaged")
    with pytest.raises(SystemExit, match="joined to sha256"):
        carry_files.join(out, tmp_path / "joined")
    assert not (tmp_path / "joined" / "x.whl").exists()
    assert json.loads((out / carry_files.MANIFEST).read_text())["files"][0]["name"] == "x.whl"
