"""The house layout: kernels/ and patches/ install as icecache_sglang subpackages and never shadow the
PyPI ``kernels`` package that SGLang imports; the index imports nothing from SGLang or ZeroMQ."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_come_from_the_top_level_folders():
    import icecache_sglang.kernels
    import icecache_sglang.patches

    assert Path(icecache_sglang.kernels.__file__).parent == ROOT / "kernels"
    assert Path(icecache_sglang.patches.__file__).parent == ROOT / "patches"


def test_our_kernels_folder_does_not_shadow_the_pypi_package():
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not Path(spec.origin or "").is_relative_to(ROOT)


def test_index_is_pure_algorithm():
    code = ("import sys, icecache_sglang.index, icecache_sglang.index.selection; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('sglang', 'zmq', 'torch')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_every_package_folder_is_installed():
    """A subpackage missing from pyproject's ``packages`` works in the editable checkout and is absent from
    the wheel (the GPU machine installs the wheel)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"icecache_sglang." + ".".join(p.parent.relative_to(ROOT / "icecache_sglang").parts)
               for p in (ROOT / "icecache_sglang").rglob("__init__.py") if p.parent != ROOT / "icecache_sglang"}
    assert folders - listed == set()
