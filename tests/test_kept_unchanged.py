"""The five plain policies keep exactly what they kept before eviction became ragged.

tests/fixtures/kept_sets.json holds digests of every layer's kept mask, made by
tests/fixtures/make_kept_sets.py at commit f10fa5c (uniform budgets, one validity mask shared by
all heads), on the default model and 3 of the paper's prompts: the five policies at
r in {0.25, 0.5, 0.75, 0.9}, and with a whitelist, fair eviction and debias 0.5 at r = 0.5.
Today's code must reproduce every digest bit for bit. About 2 minutes on one CPU thread.
"""
import json
import os
import sys

import pytest
import torch

from conftest import SHARED_DATA

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))


def test_plain_policies_keep_what_they_kept_before(default_model_folder):
    if not os.path.isfile(os.path.join(SHARED_DATA, "sys_ifeval_shuffled.jsonl")):
        pytest.skip("the paper's data is not at ../shared/data/paper")
    import make_kept_sets
    with open(make_kept_sets.OUT) as f:
        expected = json.load(f)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                       # as the fixture was made
    try:
        got = make_kept_sets.kept_digests(len(expected))
    finally:
        torch.set_num_threads(threads)
    assert got.keys() == expected.keys()
    changed = [(key, name) for key in expected for name in expected[key] if got[key][name] != expected[key][name]]
    assert not changed, f"{len(changed)} kept sets changed, e.g. {changed[:5]}"
