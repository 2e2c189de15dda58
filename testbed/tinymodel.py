"""A tiny model directory shaped like a Hugging Face checkpoint, for the demo and the tests.

It writes ``config.json`` (a LlamaForCausalLM config), ``generation_config.json``,
``tokenizer_config.json`` and ``model.safetensors``: a valid safetensors file (little-endian u64
header length, JSON header with dtype/shape/data_offsets per tensor, then the raw float32 data)
with seeded pseudo-random weights. Run ``python -m testbed.tinymodel DIR``.
"""

from __future__ import annotations

import json
import math
import random
import struct
import sys
from pathlib import Path

VOCAB, HIDDEN, INTERMEDIATE, LAYERS = 2048, 128, 256, 2

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "torch_dtype": "float32",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def _tensors() -> dict[str, tuple[int, ...]]:
    h, inter, vocab = HIDDEN, INTERMEDIATE, VOCAB
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (h, h)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, h)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, h)
        shapes[f"{p}.mlp.down_proj.weight"] = (h, inter)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    return shapes


def write(directory: Path, seed: int = 0) -> Path:
    """Write the tiny model into ``directory`` (created); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n", "utf-8")
    (directory / "generation_config.json").write_text(
        json.dumps({"max_new_tokens": 16, "do_sample": False}) + "\n", "utf-8"
    )
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast"}) + "\n",
        "utf-8",
    )
    rng = random.Random(seed)  # noqa: S311 -- reproducible weights, not a secret
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    shapes = _tensors()
    for name, shape in shapes.items():
        count = math.prod(shape)
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + 4 * count],
        }
        offset += 4 * count
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with (directory / "model.safetensors").open("wb") as out:
        out.write(struct.pack("<Q", len(head)))
        out.write(head)
        for shape in shapes.values():
            count = math.prod(shape)
            # Small values, as initialised weights are.
            values = [rng.gauss(0.0, 0.02) for _ in range(count)]
            out.write(struct.pack(f"<{count}f", *values))
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m testbed.tinymodel DIR")
    print(write(Path(sys.argv[1])))
