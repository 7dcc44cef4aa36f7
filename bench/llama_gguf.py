"""A random-weight GGUF of ``bench.decode``'s Llama-3-8B-shaped layer stack, for llama.cpp's anchors.

    python -m bench.llama_gguf OUT.gguf [--model llama3-8b-layers]

llama.cpp's K-quants (Q2_K, Q3_K) need rows that are multiples of 256, which SmolLM2's hidden
size (576) is not; the Llama-3-8B shapes are.  Decode speed depends on the shapes, not the values,
so this writes the same shapes as ``bench.decode``'s random model (4 decoder layers, a vocabulary
of 1024 placeholder tokens so that the layers, not the embedding, set the speed) as an F32 GGUF
that ``llama-quantize`` turns into Q4_0, Q3_K or Q2_K and ``llama-bench`` times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench.decode import RANDOM_MODELS


def write_gguf(path: Path, shape: dict, seed: int = 0) -> None:
    """Write an F32 llama GGUF of ``shape`` (``bench.decode``'s config keys) with random weights."""
    import gguf

    hidden, mlp, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv_heads, vocab = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(shape["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(mlp)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(shape["rope_theta"])
    writer.add_layer_norm_rms_eps(shape["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # A placeholder vocabulary: llama.cpp needs one to load a model; llama-bench feeds token ids.
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>".encode() for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def tensor(name: str, *dims: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(dims, dtype=np.float32) * 0.02))

    tensor("token_embd.weight", vocab, hidden)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", mlp, hidden)
        tensor(f"blk.{i}.ffn_up.weight", mlp, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, mlp)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    tensor("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", choices=sorted(RANDOM_MODELS), default="llama3-8b-layers")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new file")
    write_gguf(args.out, RANDOM_MODELS[args.model][0])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
