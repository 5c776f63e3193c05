"""nanokv's compression during decoding keeps the positions and generates the tokens kvpress 0.5.5's
DecodingPress does (tests/kvpress055_decode_parity.py), on 2 of the paper's prompts.

Runs only where kvpress 0.5.5 is importable (its own venv: see tests/kvpress055_parity.py), e.g.
    ../kvpress055/bin/python -m pytest -q tests/test_kvpress055_decode_parity.py
and is skipped in the project's normal environment, which has no kvpress.
"""
import os
import sys

import pytest

kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed (see tests/kvpress055_parity.py)")
torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

N_PROMPTS = 2


@pytest.fixture(scope="module")
def tallies():
    if not hasattr(kvpress, "DecodingPress"):
        pytest.skip("this kvpress has no DecodingPress (0.5.5 needed)")
    import kvpress055_decode_parity as parity
    if not (parity.DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip("default weights not prepared (run: python weights/prepare.py)")
    if not (parity.DEFAULT_DATA / "sys_ifeval_shuffled.jsonl").is_file():
        pytest.skip("the paper's data is not at ../shared/data/paper")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return parity.run(n_prompts=N_PROMPTS, verbose=False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("policy", ["knorm", "tova"])
def test_tokens_and_kept_positions_match_kvpress_055(tallies, policy):
    import kvpress055_decode_parity as parity
    t = tallies[policy]
    assert t.tokens_identical == N_PROMPTS, f"generated tokens differ: {t.first_token_diffs}"
    assert t.schedule_diffs == 0, f"cut at other decode steps than kvpress: {t.examples}"
    assert t.real == 0, f"kept positions differ from kvpress 0.5.5 beyond exact score ties: {t.examples}"
    cuts = (parity.NEW_TOKENS - 1) // parity.INTERVAL                   # decode forwards 16 and 32
    assert t.heads == N_PROMPTS * cuts * 30 * 3 and t.not_compared == 0
    assert t.ties == 0, "a float32 (not exact) tie: the scores differ from kvpress's"
    if policy == "tova":                                                 # attention scores do not tie exactly
        assert t.identical == t.heads


def test_streaming_llm_first_cut_matches_and_later_cuts_follow_positions(tallies):
    import kvpress055_decode_parity as parity
    t = tallies["streaming_llm"]
    assert t.schedule_diffs == 0 and t.real == 0 and t.identical == t.heads == N_PROMPTS * 30 * 3, t.examples
    assert all(i > 2 * parity.INTERVAL for _, i in t.first_token_diffs), t.first_token_diffs
    # after its first cut kvpress reads recency from tensor rows in score order; nanokv from positions
    assert t.later_cuts == N_PROMPTS * 30 * 3 and t.later_nanokv_wrong == 0
    assert t.later_differ == t.later_cuts, "kvpress 0.5.5 now keeps the most recent positions: update the README"
