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


def ensure_tiny_model(num_layers: int = 4, max_positions: int = 65536, seed: int = 0) -> Path:
    """A Hugging Face folder: 4 layers, hidden 128, 4 query / 2 KV heads of dim 32 (GQA), float32."""
    out = cache_dir() / "models" / f"tiny-llama-{num_layers}l-s{seed}"
    if (out / ".complete").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_dir = ensure_model(DEFAULT_MODEL)
    base = json.loads((tok_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=max_positions,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
        bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"],
        dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # larger logits than the 0.02 init: greedy choices far from ties
        model.model.embed_tokens.weight.mul_(10.0)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, tmp / name)
    (tmp / ".complete").write_text(json.dumps({"model": "tiny-llama", "layers": num_layers, "seed": seed}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
