"""nanokv's KVzip keeps the positions kvpress 0.5.5's KVzipPress keeps (tests/kvpress055_kvzip_parity.py), on one of
the paper's prompts, for the global budget, layerwise, KVzip+ and several chunks, and with KVzipPress's own prefix.

Runs only where kvpress is importable (its own venv, see tests/kvpress055_parity.py), e.g.
    ../kvpress055/bin/python -m pytest -q tests/test_kvpress055_kvzip_parity.py
and is skipped in the project's environment.
"""
import os
import sys

import pytest

pytest.importorskip("kvpress", reason="kvpress is not installed (see tests/kvpress055_parity.py for its venv)")
torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvpress055_kvzip_parity as parity  # noqa: E402


def test_kept_positions_match_kvzip_press():
    if not (parity.DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip("default weights not prepared (run: python weights/prepare.py)")
    if not (parity.DEFAULT_DATA / "sys_ifeval_shuffled.jsonl").is_file():
        pytest.skip("the paper's data is not at ../shared/data/paper")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tallies, skipped = parity.run(n_prompts=1, ratios=(0.5, 0.9), unpatched=True)
    finally:
        torch.set_num_threads(threads)
    assert not any(t.real for t in tallies.values()), {k: t.examples for k, t in tallies.items() if t.real}
    assert all(t.heads == 30 * 3 for t in tallies.values())
    for rows in skipped.values():                      # KVzipPress alone never replays positions 4 .. 23
        assert all(own == 0.0 < patched for _, patched, own in rows)
