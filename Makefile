# The two commands of the README: `make serve` and `make test`. Each installs what it needs
# into .venv first (torch 2.13.0 before the rest, so pip never pulls a multi-GB CUDA build
# on a CPU machine).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin


$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: install
	@echo "Starting the demo model (2 model-parallel ranks) on http://localhost:8000 ..."
	@echo "When 'Deployed app' appears, in another shell:"
	@echo "  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"model\": \"llama-demo\", \"prompt\": \"Q: What is the largest animal?\\\\nA:\", \"max_tokens\": 24, \"temperature\": 0}'"
	@echo "  curl -s localhost:8000/cluster"
	$(BIN)/serve run deploy/config.yaml

test: install
	$(BIN)/python -m pytest tests -q

.PHONY: install serve test
