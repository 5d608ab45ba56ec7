"""A tiny random Llama for tests of mechanics: SmolLM2's real tokenizer and chat template, random weights.

Outputs are meaningless but deterministic (seeded weights, greedy decoding), which is what tests of
plumbing need: token-identical comparisons between server modes, long contexts at little cost.
Built once into ``$ICECACHE_CACHE/models/tiny-llama-<layers>l`` and reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .fetch import DEFAULT_MODEL, cache_dir, ensure_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def ensure_tiny_model(num_layers: int = 4, max_positions: int = 65536, seed: int = 0,
                      attention_gain: float = 1.0) -> Path:
    """A Hugging Face folder: 4 layers, hidden 128, 4 query / 2 KV heads of dim 32 (GQA), float32.

    ``attention_gain`` scales the attention weights (q and k by its square root: sharper attention; v and o
    by the gain: a larger share of the residual stream). At 1 the outputs barely depend on which tokens
    attention reads (the scaled-up embeddings dominate the logits), which suits plumbing tests; tests that
    must see a wrong selection in the answers use a larger gain (``SENSITIVE_GAIN``)."""
    name = f"tiny-llama-{num_layers}l-s{seed}" + (f"-g{attention_gain:g}" if attention_gain != 1.0 else "")
    out = cache_dir() / "models" / name
    if (out / ".complete").exists():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_dir = ensure_model(DEFAULT_MODEL)
    base = json.loads((tok_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=max_positions,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
        bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"],
        dtype="float32")
    marker = {"model": "tiny-llama", "layers": num_layers, "seed": seed, "attention_gain": attention_gain}
    return _save(out, LlamaForCausalLM, config, tok_dir, marker, seed, attention_gain)


#: an attention gain at which the tiny model's greedy answers change with the pages attention reads
SENSITIVE_GAIN = 30.0


def ensure_tiny_swa_model(seed: int = 0) -> Path:
    """A tiny random Gemma-2 (sliding-window attention on alternate layers, window 64), for the test that
    ``--enable-icecache`` refuses sliding-window models at launch."""
    out = cache_dir() / "models" / f"tiny-gemma2-s{seed}"
    if (out / ".complete").exists():
        return out
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok_dir = ensure_model(DEFAULT_MODEL)
    base = json.loads((tok_dir / "config.json").read_text())
    config = Gemma2Config(
        vocab_size=base["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, sliding_window=64,
        hidden_act="gelu_pytorch_tanh",  # SGLang's Gemma-2 reads the older name of hidden_activation
        bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"],
        dtype="float32")
    return _save(out, Gemma2ForCausalLM, config, tok_dir, {"model": "tiny-gemma2", "seed": seed}, seed)


def scale_weights(model, attention_gain: float = 1.0) -> None:
    """Larger logits than the 0.02 init (greedy choices far from ties), and attention weights scaled by
    ``attention_gain`` (q and k by its square root, v and o by the gain)."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
        if attention_gain != 1.0:
            for layer in model.model.layers:
                a = layer.self_attn
                a.q_proj.weight.mul_(attention_gain ** 0.5)
                a.k_proj.weight.mul_(attention_gain ** 0.5)
                a.v_proj.weight.mul_(attention_gain)
                a.o_proj.weight.mul_(attention_gain)


def _save(out: Path, model_cls, config, tok_dir: Path, marker: dict, seed: int, attention_gain: float = 1.0) -> Path:
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    scale_weights(model, attention_gain)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, tmp / name)
    (tmp / ".complete").write_text(json.dumps(marker))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
