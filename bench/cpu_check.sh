#!/usr/bin/env bash
# The CPU speed check, run alone on an idle machine (a timing is a ratio measured in one run):
#   1. bench.cpu_kernels: the dequant-matmul against fp32/bf16 torch.matmul and the byte floor;
#   2. bench.decode: decode and prefill tokens/s of the embedded SmolLM2 and of four
#      Llama-3-8B-shaped layers, fp32 (and bf16 for SmolLM2) against W4/W3/W2;
#   3. with LLAMA_CPP_BIN (a folder holding llama-bench and llama-quantize) and SMOLLM2_GGUF (the
#      embedded Q4_1 GGUF), llama.cpp's decode and prefill of the same model requantized to F32,
#      Q4_0, Q4_1, and of the Llama-3-8B-shaped stack (bench.llama_gguf) in F32, Q4_0, Q3_K, Q2_K.
# Rows go to bench/results/ (DATE, default today, names the files).  PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
date="${DATE:-$(date -u +%F)}"
out=bench/results
"$py" -m bench.cpu_kernels --out "$out/cpu-kernels-$date.jsonl"
"$py" -m bench.decode --device cpu --model default --bits 4 3 2 --group 64 --new-tokens 64 --reps 3 --bf16 \
    --out "$out/decode-cpu-smollm2-$date"
"$py" -m bench.decode --device cpu --model llama3-8b-layers --bits 4 3 2 --group 128 --new-tokens 16 --reps 3 \
    --out "$out/decode-cpu-llama3-layers-$date"
if [[ -n "${LLAMA_CPP_BIN:-}" && -n "${SMOLLM2_GGUF:-}" ]]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    for type in F32 Q4_0 Q4_1; do
        "$LLAMA_CPP_BIN/llama-quantize" --allow-requantize "$SMOLLM2_GGUF" "$work/smollm2-$type.gguf" "$type" \
            >/dev/null 2>&1
    done
    "$LLAMA_CPP_BIN/llama-bench" -m "$work/smollm2-F32.gguf" -m "$work/smollm2-Q4_0.gguf" -m "$work/smollm2-Q4_1.gguf" \
        -p 512 -n 64 -t 1,2 -r 3 -o jsonl > "$out/llama-bench-smollm2-$date.jsonl"
    "$py" -m bench.llama_gguf "$work/llama3-F32.gguf"
    for type in Q4_0 Q3_K Q2_K; do
        "$LLAMA_CPP_BIN/llama-quantize" "$work/llama3-F32.gguf" "$work/llama3-$type.gguf" "$type" >/dev/null 2>&1
    done
    "$LLAMA_CPP_BIN/llama-bench" -m "$work/llama3-F32.gguf" -m "$work/llama3-Q4_0.gguf" -m "$work/llama3-Q3_K.gguf" \
        -m "$work/llama3-Q2_K.gguf" -p 512 -n 16 -t 2 -r 3 -o jsonl > "$out/llama-bench-llama3-layers-$date.jsonl"
fi
