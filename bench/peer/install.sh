#!/usr/bin/env bash
# DataFlex 1.1.0 (with LLaMA-Factory 0.9.5) in its own venv, for `make bench-peer`; never flexfeed's .venv.
#
# DataFlex pins torch<=2.10 and its resolver would pull CUDA wheels, so torch is installed first and
# pinned (TORCH, the CPU build flexfeed uses), the two packages without their dependencies, then
# their run-time requirements within their own upper bounds, torch pinned again. LLaMA-Factory
# imports torchaudio at module level (its index wheels are CUDA builds): a stub package stands in
# for it (no audio is used), put on PYTHONPATH by run.py. torchvision, gradio, modelscope, vllm,
# deepspeed are not imported by a LoRA text run and are left out.
#
# Usage: install.sh PREFIX   (PREFIX/venv, PREFIX/stubs, PREFIX/.stamp-dataflex when done)
set -euo pipefail
PREFIX=${1:?usage: install.sh PREFIX}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH=${TORCH:-torch==2.13.0}
STAMP="$PREFIX/.stamp-dataflex"
# the stamp holds what installed it (this script's hash and TORCH): an edit of either reinstalls
RECIPE="$(sha256sum "$0" | cut -d' ' -f1) $TORCH"
if [ -x "$PREFIX/venv/bin/dataflex-cli" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$RECIPE" ]; then
  echo "DataFlex venv up to date: $PREFIX/venv (remove $STAMP to reinstall)"
  exit 0
fi
mkdir -p "$PREFIX"
test -x "$PREFIX/venv/bin/python" || "$PYTHON" -m venv "$PREFIX/venv"
PIP="$PREFIX/venv/bin/pip"
"$PIP" install -q "$TORCH"
"$PIP" install -q --no-deps dataflex==1.1.0 llamafactory==0.9.5
"$PIP" install -q "$TORCH" \
  "transformers>=4.55,<=5.6,!=4.57.0" "accelerate>=1.3,<=1.11" "peft>=0.18.0,<=0.18.1" \
  "datasets>=2.16,<=4.0" "trl>=0.18,<=0.24" traker "tyro==0.8.14" omegaconf sentencepiece protobuf \
  einops matplotlib "pandas<3" scipy safetensors fire pyyaml packaging tiktoken
mkdir -p "$PREFIX/stubs/torchaudio"
cat > "$PREFIX/stubs/torchaudio/__init__.py" <<'PY'
"""Stand-in for torchaudio: LLaMA-Factory imports it at module level; a text-only run never calls it."""
PY
"$PREFIX/venv/bin/pip" freeze > "$PREFIX/requirements.lock"
echo "$RECIPE" > "$STAMP"
echo "DataFlex venv ready: $PREFIX/venv"
