"""nanokv's compression during decoding keeps the positions and generates the tokens kvpress 0.5.5's
DecodingPress does (tests/kvpress055_decode_parity.py), on 2 of the paper's prompts.

The comparison against kvpress runs only where kvpress 0.5.5 is importable (its own venv: see
tests/kvpress055_parity.py), e.g.
    ../kvpress055/bin/python -m pytest -q tests/test_kvpress055_decode_parity.py   # 80 s of CPU, 3-4 min on this busy machine
(that venv needs pytest: ../kvpress055/bin/pip install pytest) and is skipped in the project's normal environment, which has no kvpress. The checks of the
script's classifier on hand-made cuts run everywhere.
"""
import os
import sys

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kvpress055_decode_parity as parity  # noqa: E402

N_PROMPTS = 2


# ----------------------------------------------------------------------------- the classifier, on hand-made cuts

L, STEP = 8, 2
TOKENS = list(range(100, 100 + STEP + parity.INTERVAL + 1))        # as many as the second cut reads
SCORES = [5.0, 1.0, 4.0, 4.0, 0.0, 3.0, 2.0, 0.5, 6.0, 7.0]      # positions 0..9; 2 and 3 tie at the cut


def kvpress_cuts(second_kept=None):
    """One layer, one KV head: a cut after decode forward STEP keeping 4 of positions 0..9 (kvpress takes 2 of
    the tie), and optionally a second one INTERVAL forwards later over its kept rows and the new ones."""
    cuts = [dict(layer=0, step=STEP, rows=torch.arange(L + STEP)[None], scores=torch.tensor([SCORES]),
                 kept=[[0, 2, 8, 9]])]
    if second_kept is not None:
        rows = torch.tensor([[9, 8, 0, 2] + list(range(L + STEP, L + STEP + parity.INTERVAL))])
        scores = torch.tensor([[9.0, 8.0, 0.0, 7.0] + [1.0] * (parity.INTERVAL - 1) + [10.0]])
        cuts.append(dict(layer=0, step=STEP + parity.INTERVAL, rows=rows, scores=scores, kept=[second_kept]))
    return dict(length=L, tokens=TOKENS, cuts=cuts)


def nanokv_cuts(*kept, steps=None, tokens=None):
    steps = steps or [STEP + i * parity.INTERVAL for i in range(len(kept))]
    return dict(length=L, tokens=list(tokens or TOKENS), cuts=[dict(layer=0, step=s, kept=[k]) for s, k in zip(steps, kept)])


def verdicts(theirs, ours):
    tally = parity.Tally()
    parity.compare(tally, theirs, ours, "knorm", "p")
    return tally


def test_classifier_identical_and_exact_tie():
    assert verdicts(kvpress_cuts(), nanokv_cuts([0, 2, 8, 9])).identical == 1
    tally = verdicts(kvpress_cuts(), nanokv_cuts([0, 3, 8, 9]))                # the other of the tie
    assert tally.exact_ties == 1 and tally.real == 0


def test_classifier_catches_a_real_difference():
    tally = verdicts(kvpress_cuts(), nanokv_cuts([0, 5, 8, 9]))                # score 3 < the cut's 4
    assert tally.real == 1 and tally.examples[0]["nanokv_only"] == [5]
    assert verdicts(kvpress_cuts(), nanokv_cuts([0, 8, 9])).real == 1            # one fewer: not a tie


def test_classifier_catches_another_schedule_and_other_tokens():
    assert verdicts(kvpress_cuts(), nanokv_cuts([0, 2, 8, 9], steps=[STEP + 1])).schedule_diffs == 2
    tally = verdicts(kvpress_cuts(), nanokv_cuts([0, 5, 8, 9], tokens=[100, 7] + TOKENS[2:]))
    assert tally.first_token_diffs == [("p", 1)] and tally.not_compared == 1 and tally.real == 0


def test_classifier_inherits_only_from_an_earlier_tie():
    last = L + STEP + parity.INTERVAL - 1
    after_tie = verdicts(kvpress_cuts([2, 8, 9, last]), nanokv_cuts([0, 3, 8, 9], [3, 8, 9, last]))
    assert (after_tie.exact_ties, after_tie.inherited, after_tie.real) == (1, 1, 0)
    no_tie = verdicts(kvpress_cuts([2, 8, 9, last]), nanokv_cuts([0, 2, 8, 9], [3, 8, 9, last]))
    assert no_tie.real == 1


def test_streaming_expected_keeps_sinks_and_most_recent():
    kept = parity.streaming_expected(206, 32)
    assert kept[:4] == [0, 1, 2, 3] and kept[4:] == list(range(206 + 32 - 124, 206 + 32)) and len(kept) == 128


# ----------------------------------------------------------------------------- against kvpress 0.5.5

@pytest.fixture(scope="module")
def tallies():
    kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed (see tests/kvpress055_parity.py)")
    if not hasattr(kvpress, "DecodingPress"):
        pytest.skip("this kvpress has no DecodingPress (0.5.5 needed)")
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
    t = tallies["streaming_llm"]
    assert t.schedule_diffs == 0 and t.real == 0 and t.identical == t.heads == N_PROMPTS * 30 * 3, t.examples
    assert all(i > 2 * parity.INTERVAL for _, i in t.first_token_diffs), t.first_token_diffs
    # after its first cut kvpress reads recency from tensor rows in score order; nanokv from positions
    assert t.later_cuts == N_PROMPTS * 30 * 3 and t.later_nanokv_wrong == 0
    assert t.later_differ == t.later_cuts, "kvpress 0.5.5 now keeps the most recent positions: update the README"
