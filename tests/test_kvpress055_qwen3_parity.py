"""nanokv keeps the positions kvpress 0.5.5 keeps on a tiny random Qwen3 (tests/kvpress055_qwen3_parity.py):
the paper's five policies, 2 prompts, r in {0.25, 0.5, 0.75, 0.9}.

Runs only where kvpress 0.5.5 is importable (its own venv: see the top of tests/kvpress055_parity.py), e.g.
    ../kvpress055/bin/python -m pytest -q tests/test_kvpress055_qwen3_parity.py
and is skipped in the project's normal environment, which has no kvpress.
"""
import os
import sys

import pytest

kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed (see tests/kvpress055_parity.py)")
torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def test_kept_positions_match_kvpress_055_on_qwen3():
    import kvpress055_qwen3_parity as parity
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tally = parity.run(2, tuple(parity.POLICIES), parity.RATIOS, verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert all(t["REAL"] == 0 for t in tally.values()), tally
    assert sum(t["identical"] for t in tally.values()) > 0.9 * sum(t["heads"] for t in tally.values())
