"""A tiny model directory shaped like a Hugging Face checkpoint, for the demo and the tests.

:func:`write` writes ``config.json`` (a LlamaForCausalLM config), ``generation_config.json``,
``tokenizer_config.json`` and ``model.safetensors``: a valid safetensors file (little-endian u64
header length, JSON header with dtype/shape/data_offsets per tensor, then the raw float32 data)
with seeded pseudo-random weights. It needs only the standard library.

:func:`write_tokenizer` adds what a real engine needs to serve it: a byte-level BPE tokenizer
trained with the ``tokenizers`` library on seeded generated text, exactly ``VOCAB`` tokens, the
first ones special (``<pad>``, ``<s>``, ``</s>`` at LlamaConfig's default ids, then the chat
roles), as ``tokenizer.json``, and a ``tokenizer_config.json`` for PreTrainedTokenizerFast with a
chat template. No hub, no download. The same seed and ``tokenizers`` release give the same bytes.

Run ``python -m testbed.tinymodel DIR`` for the model, ``... DIR --tokenizer`` for the tokenizer
(where ``tokenizers`` is installed: the vLLM test image runs this file as a script).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import struct
import sys
from pathlib import Path
from typing import Any

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


# Special tokens first, so their ids are fixed: bos 1 and eos 2 are LlamaConfig's defaults.
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLES = ("system", "user", "assistant")
END = "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, *(f"<|{role}|>" for role in ROLES), END)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MAX_LENGTH = 512
_SYLLABLES = (*(c + v for c in "bdfghklmnprstvwz" for v in "aeiou"), "th", "sh", "qu")
_CORPUS_LINES = 4000
_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


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
    if not (directory / "tokenizer.json").exists():  # never replace write_tokenizer's
        (directory / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": MAX_LENGTH, "tokenizer_class": _TOKENIZER_CLASS})
            + "\n",
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


def corpus(seed: int = 0) -> list[str]:
    """Seeded sentences of made-up words, digits and punctuation to train the tokenizer on."""
    rng = random.Random(seed)  # noqa: S311 -- reproducible text, not a secret
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    lines = []
    for _ in range(_CORPUS_LINES):
        sentence = [rng.choice(words) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            sentence.insert(rng.randrange(len(sentence)), str(rng.randint(0, 9999)))
        text = " ".join(sentence)
        lines.append(text[0].upper() + text[1:] + rng.choice(".!?,;:"))
    return lines


def write_tokenizer(directory: Path, seed: int = 0) -> Path:
    """Train and write the tokenizer into ``directory`` (created); returns it. Needs the
    ``tokenizers`` library (imported here, so that :func:`write` never does)."""
    # One thread: the trainer's result must not depend on how work is split.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tk: Any = importlib.import_module("tokenizers")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(seed), trainer=trainer)
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if tokenizer.get_vocab_size() != VOCAB or ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(
            f"trained {tokenizer.get_vocab_size()} tokens (special ids {ids}), "
            f"the model has {VOCAB}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    added = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": _TOKENIZER_CLASS,
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (directory / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2) + "\n", "utf-8"
    )
    return directory


def main(argv: list[str]) -> int:
    args = argv[1:]
    tokenizer = "--tokenizer" in args
    paths = [a for a in args if a != "--tokenizer"]
    if len(paths) != 1 or paths[0].startswith("-"):
        print("usage: python -m testbed.tinymodel DIR [--tokenizer]", file=sys.stderr)
        return 2
    print(write_tokenizer(Path(paths[0])) if tokenizer else write(Path(paths[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
