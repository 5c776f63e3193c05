"""The worked example of docs/adding-a-policy.md: a new policy, its reference test, and a run.

The example policy, "value norm", keeps the entries whose *values* have the largest L2 norm
(the counterpart of K-norm, which keeps the keys with the smallest norm). It lives here and is
registered into policies.POLICIES only while a test runs (pytest's monkeypatch removes it
afterwards), so the project's list of policies stays as it is. To add a policy for real, put
the function in policies.py and its line in POLICIES, as the doc shows.
"""
import json
import math

import pytest
import torch

import policies
from policies import Compression, Context, covering_spans
from reference import ref_quotas

L = 45
POLICIES_BEFORE = dict(policies.POLICIES)


# ----------------------------------------------------------------------------- the policy (docs/adding-a-policy.md, step 1)

def value_norm(queries, keys, values, spans, context):
    """Value norm: keep the entries whose values have the largest L2 norm (per KV head)."""
    return values.float().norm(dim=-1)                                   # (1, H_kv, L)


@pytest.fixture
def registered(monkeypatch):
    """value_norm in policies.POLICIES for one test; monkeypatch takes it out again afterwards."""
    monkeypatch.setitem(policies.POLICIES, "value_norm", value_norm)


# ----------------------------------------------------------------------------- its test (step 2)

@pytest.fixture(scope="module")
def prefill(tiny_model):
    """The tokens, and each layer's queries, keys and values after a system prefill of L tokens.

    The tokens are distinct: a value carries no position (RoPE rotates only q and k), so a
    repeated token would have the same value in layer 0, and a tie at the cut would make
    the expected top-k ambiguous.
    """
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randperm(tiny_model.args.vocab_size, generator=generator)[:L][None]     # (1, L)
    cache = tiny_model.new_cache()
    cache.record_queries()
    tiny_model(tokens, cache)
    return tokens, [(q.clone(), cache.keys[i][:, :, :L].clone(), cache.values[i][:, :, :L].clone())
                    for i, q in enumerate(cache.queries)]


def ref_value_norm(values):
    """Slow and obvious: sqrt of the sum of squares, in float64, one position at a time. (H_kv, L)"""
    return torch.tensor([[math.sqrt(sum(float(x) ** 2 for x in values[0, h, j])) for j in range(values.shape[2])]
                         for h in range(values.shape[1])], dtype=torch.float64)


def ref_top(scores, start, end, k):
    """The k best positions in [start, end) of one head's reference scores, as a set.

    Refuses a near-tie at the cut (it would make the expected set depend on float32 rounding).
    """
    ranked = sorted(range(start, end), key=lambda j: -float(scores[j]))
    if 0 < k < end - start:
        assert float(scores[ranked[k - 1]]) - float(scores[ranked[k]]) > 1e-5, "near-tie at the cut: pick another seed"
    return set(ranked[:k])


def compress(model, tokens, spec):
    """The compressed cache, and what compression kept (.kept: per layer (1, H_kv, L)) and reported."""
    cache = model.new_cache()
    compressed = policies.prefill(model, cache, tokens, spec)
    return cache, compressed


def test_scores_equal_the_reference(prefill):
    for q, k, v in prefill[1]:
        fast = value_norm(q, k, v, [(0, L)], Context(0, 1))[0]
        assert fast.shape == (k.shape[1], L)
        assert torch.allclose(fast.double(), ref_value_norm(v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_kept_entries_are_the_reference_top_k(registered, tiny_model, prefill, ratio):
    tokens, layers = prefill
    cache, compressed = compress(tiny_model, tokens, Compression("value_norm", ratio))
    n_kept = int(L * (1 - ratio))
    assert compressed.reports[0]["n_kept"] == n_kept and cache.lengths == [n_kept] * len(layers)
    for layer, (q, k, v) in enumerate(layers):
        reference = ref_value_norm(v)                                    # (H_kv, L)
        for h in range(k.shape[1]):
            kept = compressed.kept[layer][0, h].nonzero()[:, 0]          # kept positions, sorted
            assert set(kept.tolist()) == ref_top(reference[h], 0, L, n_kept)
            assert torch.equal(cache.values[layer][0, h, :n_kept], v[0, h, kept])   # gathered in order


def test_fair_eviction_takes_the_reference_top_of_each_span(registered, tiny_model, prefill):
    partitions = [(2, 15), (15, 33), (33, 43)]                           # head and tail go to first/last
    spans = covering_spans(partitions, L)
    cache, compressed = compress(tiny_model, prefill[0], Compression("value_norm", 0.6, partitions=partitions))
    quotas = ref_quotas([e - s for s, e in spans], compressed.reports[0]["n_kept"])
    for layer, (q, k, v) in enumerate(prefill[1]):
        reference = ref_value_norm(v)
        for h in range(k.shape[1]):
            kept = set(compressed.kept[layer][0, h].nonzero()[:, 0].tolist())
            expected = set().union(*(ref_top(reference[h], s, e, int(n)) for (s, e), n in zip(spans, quotas)))
            assert kept == expected


# ----------------------------------------------------------------------------- run it (step 3)

def test_evaluate_runs_the_new_policy(registered, default_model_folder, tmp_path):
    """What `python evaluate.py --policy value_norm` does once the policy is in policies.py."""
    import evaluate
    out = tmp_path / "run"
    evaluate.main(["--policy", "value_norm", "--ratios", "0,0.5", "--limit", "2", "--max-new-tokens", "4",
                   "--out", str(out)])
    records = [json.loads(line) for line in open(out / "responses.jsonl")]
    assert sorted((r["policy"], r["ratio"]) for r in records) == [("value_norm", 0.0)] * 2 + [("value_norm", 0.5)] * 2
    assert all(r["n_kept"] == int(r["system_tokens"] * 0.5) for r in records if r["ratio"] == 0.5)
    assert set(json.load(open(out / "summary.json"))["results"]) == {"value_norm|none"}


def test_the_project_policy_list_is_unchanged():
    """Runs last: the fixture's registration did not outlive its tests."""
    assert policies.POLICIES == POLICIES_BEFORE
