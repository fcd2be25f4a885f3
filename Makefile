# adn — two commands do everything: `make demo` and `make test` (each sets up what it needs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: venv data demo test lint package-check lock contract bench reproduce clean

# Exact versions from constraints.txt (pyproject.toml only declares ranges): every machine tests the same set.
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

data:  ## Fashion-MNIST from Debian where apt exists; otherwise torchvision downloads it at first use
	bash scripts/get-fashion-mnist.sh

demo: venv data
	bash scripts/demo.sh

test: venv lint
	$(BIN)/python -m pytest -q

lint: venv  ## style and obvious bugs, and the formatting (configured in pyproject.toml; `ruff format` fixes the latter)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

package-check: venv  ## build the wheel, install it in a fresh venv with the constraints, run `adn --help`
	bash scripts/check-package.sh

lock: venv  ## refresh constraints.txt from the installed environment (after changing a range)
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^adn'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

reproduce: venv data  ## the paper's claims at small scale -> docs/reproduction.md (15 core-hours measured: ~7.5 h on 2 cores; resumable, in parts)
	$(BIN)/adn reproduce --jobs 2

contract: venv
	$(BIN)/python ../shared/contract_check.py

bench: venv
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/latency.py

clean:
	rm -rf $(VENV) runs .pytest_cache
