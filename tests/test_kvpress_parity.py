"""nanokv keeps the positions kvpress 0.2.10 keeps (tests/kvpress_parity.py), on 2 of the paper's prompts.

Runs only where kvpress is importable (its own venv: see the top of tests/kvpress_parity.py), e.g.
    /tmp/kvp/bin/python -m pytest -q tests/test_kvpress_parity.py
and is skipped in the project's normal environment, which has no kvpress.
"""
import os
import sys

import pytest

pytest.importorskip("kvpress", reason="kvpress is not installed (see tests/kvpress_parity.py for its venv)")
torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvpress_parity  # noqa: E402


def test_kept_positions_match_kvpress():
    if not (kvpress_parity.DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip("default weights not prepared (run: python weights/prepare.py)")
    if not (kvpress_parity.DEFAULT_DATA / "sys_ifeval_shuffled.jsonl").is_file():
        pytest.skip("the paper's data is not at ../shared/data/paper")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = kvpress_parity.run(n_prompts=2, verbose=False)
    finally:
        torch.set_num_threads(threads)
    real = {k: t.examples for k, t in out["tallies"].items() if t.real}
    real |= {("h2o (same q,k)", r): t.examples for r, t in out["h2o_same"].items() if t.real}
    assert not real, f"kept positions differ from kvpress beyond score ties: {real}"
    for policy, t in out["tallies"].items():
        assert t.heads == 2 * 30 * 3, policy
    # the scoring functions agree to float32 rounding
    for policy, (diff, scale) in out["score_diffs"].items():
        assert diff <= 1e-5 * max(scale, 1.0), (policy, diff)
    # SnapKV at r=0.9 on these prompts (L=165, 163: n_kept=16 = the window) hits kvpress's scores.max() pad
    # tie: kvpress keeps the best real token and drops a window token, nanokv keeps the window
    assert out["tallies"][("snapkv", 0.9)].max_ties > 0
