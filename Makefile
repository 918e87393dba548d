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
	@echo "When 'Deployed app' appears, in another shell (the model loads in the background: until it is"
	@echo "ready, GET /health names the start's stage and requests wait for it):"
	@echo "  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"model\": \"llama-demo\", \"prompt\": \"Q: What is the largest animal?\\\\nA:\", \"max_tokens\": 24, \"temperature\": 0}'"
	@echo "  curl -s localhost:8000/cluster"
	$(BIN)/serve run deploy/config.yaml

# The multinode tier builds Ray nodes from network/PID/mount namespaces, with an SSH server
# each for `ray up`: as root on Debian/Ubuntu these packages are installed here; elsewhere
# that tier skips and says why.
SYSTEM_PACKAGES := iproute2 util-linux openssh-server openssh-client rsync
sysdeps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    ! (command -v ip && command -v unshare && test -x /usr/sbin/sshd && command -v rsync) >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	fi

test: install sysdeps
	$(BIN)/python -m pytest tests -q

.PHONY: install serve test sysdeps
