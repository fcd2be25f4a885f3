# adn — two commands do everything: `make demo` and `make test` (each sets up what it needs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: venv data demo test contract bench reproduce clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

data:  ## Fashion-MNIST from Debian where apt exists; otherwise torchvision downloads it at first use
	bash scripts/get-fashion-mnist.sh

demo: venv data
	bash scripts/demo.sh

test: venv
	$(BIN)/python -m pytest -q

reproduce: venv data  ## the paper's claims at small scale -> docs/reproduction.md (15 core-hours measured: ~7.5 h on 2 cores; resumable, in parts)
	$(BIN)/adn reproduce --jobs 2

contract: venv
	$(BIN)/python ../shared/contract_check.py

bench: venv
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/latency.py

clean:
	rm -rf $(VENV) runs .pytest_cache
