# Set-up and everyday commands. `make farm` and `make test` work on a fresh machine: they create
# (or reuse) the virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and on its own: the CPU build here, a CUDA build on GPU nodes
# (override, e.g. `make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'`).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: farm test test-all lint venv sysdeps clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# System tools the tests use as a user would meet them (ffprobe to check the MP4s).
sysdeps:
	@command -v ffprobe >/dev/null || { \
	  echo "installing ffmpeg (for ffprobe) with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; }
	@command -v promtool >/dev/null || { \
	  echo "installing prometheus (+ promtool, for the monitoring tests) with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium (for the web page test) with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The farm on the embedded defaults: local Ray, tiny-random model, results in ./outputs,
# HTTP on 127.0.0.1:8000, in the foreground (Ctrl-C stops it). FARM_ARGS adds flags,
# e.g. `make farm FARM_ARGS='--simulate 12gb:2,24gb:1'`.
FARM_ARGS ?=
farm: venv
	$(BIN)/i2v-farm up $(FARM_ARGS)

# The default test run (fast; `make test-all` adds the slow ones), after the linter.
test: venv sysdeps lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: venv sysdeps lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (pyflakes, pycodestyle, import order, bugbear), configured in pyproject.toml.
lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
