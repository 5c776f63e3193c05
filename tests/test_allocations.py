"""Budget allocations (policies.ALLOCATIONS) against slow references, and the invariants of every
(policy, allocation) pair: a user's new policy or allocation is tested by registering it.

References: AdaKV by sorting Python lists (each head's safeguard, then one ranking over all
heads of the layer), PyramidKV by the formula of kvpress 0.5.5's get_layer_budget written out.
"""
import math

import pytest
import torch

from policies import (ALLOCATIONS, POLICIES, REPLAYS, Compression, Context, adakv, covering_spans,
                      prefill, pyramid)
from reference import kept_masks, ref_adakv_counts, ref_pyramid_budget, ref_quotas, ref_snapkv

L = 45
PAIRS = [(p, a) for p in POLICIES if p != "full" and p not in REPLAYS for a in ALLOCATIONS]   # KVzip: test_kvzip


@pytest.fixture(scope="module")
def layers(tiny_model):
    """Queries, keys and values of every layer after a system prefill of L tokens."""
    tokens = torch.randint(0, tiny_model.args.vocab_size, (1, L), generator=torch.Generator().manual_seed(5))
    cache = tiny_model.new_cache()
    cache.record_queries()
    tiny_model(tokens, cache)
    return [(q.clone(), cache.keys[i][:, :, :L].clone(), cache.values[i][:, :, :L].clone())
            for i, q in enumerate(cache.queries)]


# ----------------------------------------------------------------------------- references

def counts_of(spec, layers, inv_freq):
    """What the allocation gives each KV head of each layer (n_layers, H_kv), from the whole-turn scores."""
    plain = [lambda q=q, k=k, v=v, i=i: (POLICIES[spec.policy](q, k, v, [(0, L)], Context(i, len(layers), inv_freq=inv_freq),
                                                            **spec.options)[0], None)
             for i, (q, k, v) in enumerate(layers)]
    held = torch.full((len(layers), layers[0][1].shape[1]), L)
    return ALLOCATIONS[spec.allocation](plain, held, L * (1 - spec.ratio), spec.ratio)


# ----------------------------------------------------------------------------- AdaKV

@pytest.mark.parametrize("trial", range(10))
def test_adakv_counts_equal_the_reference_on_random_scores(trial):
    g = torch.Generator().manual_seed(trial)
    H, n = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(5, 80, (1,), generator=g))
    scores = torch.rand(H, n, generator=g) * torch.rand(H, 1, generator=g) * 10    # heads on different scales
    for n_kept in (1, 2, n // 3, n // 2, n - 1):
        counts = adakv([lambda: (scores, None)], torch.full((1, H), n), n_kept, None)[0]
        assert counts.tolist() == ref_adakv_counts(scores.tolist(), n_kept)


@pytest.mark.parametrize("policy", ["snapkv", "knorm", "h2o", "random", "expected_attention", "keydiff"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_adakv_layer_totals_safeguard_and_top_sets(layers, tiny_model, policy, ratio):
    spec = Compression(policy, ratio, allocation="adakv")
    n_kept, safe = spec.n_kept(L), max(1, int(spec.n_kept(L) * 0.2))
    masks = kept_masks(spec, layers, tiny_model.inv_freq)
    for index, (q, k, v) in enumerate(layers):
        where = Context(index, len(layers), inv_freq=tiny_model.inv_freq)
        kept = masks[index]                                                           # (H_kv, L)
        scores = POLICIES[policy](q, k, v, [(0, L)], where)[0]
        counts = kept.sum(-1)
        assert int(counts.sum()) == k.shape[1] * n_kept                             # the layer's total
        assert (counts >= safe).all()                                               # every head's safeguard
        assert counts.tolist() == ref_adakv_counts(scores.tolist(), n_kept)
        for h in range(k.shape[1]):                                                 # each head keeps a top set
            best = scores[h].topk(int(counts[h])).values
            got = scores[h, kept[h]].sort(descending=True).values
            assert torch.equal(got, best)


def test_adakv_moves_budget_between_heads(layers):
    """Not vacuous: on the tiny model some heads keep more than n_kept and others less."""
    spec = Compression("snapkv", 0.5, allocation="adakv")
    counts = [kept.sum(-1) for kept in kept_masks(spec, layers)]
    assert any(len(set(c.tolist())) > 1 for c in counts)


# ----------------------------------------------------------------------------- PyramidKV

@pytest.mark.parametrize("n_layers", [1, 2, 16, 30, 32])
def test_pyramid_budgets_equal_the_formula(n_layers):
    for length in (10, 40, 45, 100, 165, 1000):
        for ratio in (0.1, 0.25, 0.5, 0.75, 0.9):
            budgets = pyramid(None, torch.full((n_layers, 1), length), length * (1 - ratio), ratio)[:, 0].tolist()
            assert budgets == [ref_pyramid_budget(length, length * (1 - ratio), i, n_layers) for i in range(n_layers)]
            mean = sum(budgets) / n_layers
            if n_layers > 1:                                    # one layer gets the pyramid's top, as in kvpress
                assert abs(mean - length * (1 - ratio)) <= 0.5 + 1e-9, (length, ratio, budgets)
            assert budgets == sorted(budgets, reverse=True)                       # more in early layers


def test_pyramid_is_steep_when_it_fits():
    budgets = pyramid(None, torch.full((30, 1), 165), 165 * 0.5, 0.5)[:, 0].tolist()
    assert budgets[0] == 149 and budgets[-1] == 16                             # L - window ... window
    assert pyramid(None, torch.full((30, 1), 20), 20 * 0.5, 0.5)[0, 0] == 10   # too short: round(L (1 - r))


# ----------------------------------------------------------------------------- every policy x allocation

@pytest.mark.parametrize("policy,allocation", PAIRS)
@pytest.mark.parametrize("ratio", [0.3, 0.8])
def test_kept_counts_are_the_allocations_and_protected_tokens_stay(layers, tiny_model, policy, allocation, ratio):
    spec = Compression(policy, ratio, allocation=allocation)
    masks, all_counts = kept_masks(spec, layers, tiny_model.inv_freq), counts_of(spec, layers, tiny_model.inv_freq)
    for index, (q, k, v) in enumerate(layers):
        where = Context(index, len(layers), inv_freq=tiny_model.inv_freq)
        kept = masks[index]
        assert kept.shape == (k.shape[1], L) and kept.dtype == torch.bool
        counts = all_counts[index]
        assert torch.equal(kept.sum(-1), counts) and (counts >= 1).all()
        if allocation == "uniform":
            assert (counts == spec.n_kept(L)).all()
        scores = POLICIES[policy](q, k, v, [(0, L)], where)[0]
        protected = scores == math.inf
        for h in range(k.shape[1]):
            if int(protected[h].sum()) <= int(counts[h]):
                assert kept[h][protected[h]].all()


@pytest.mark.parametrize("policy,allocation", PAIRS)
def test_whitelist_is_kept_under_every_allocation(layers, tiny_model, policy, allocation):
    whitelist = [10, 11, 12, 13]
    spec = Compression(policy, 0.5, allocation=allocation, whitelist=whitelist)
    masks = kept_masks(spec, layers, tiny_model.inv_freq)
    for index, (q, k, v) in enumerate(layers):
        where = Context(index, len(layers), inv_freq=tiny_model.inv_freq)
        kept = masks[index]
        counts = kept.sum(-1)
        protected = POLICIES[policy](q, k, v, [(0, L)], where)[0] == math.inf
        for h in range(k.shape[1]):
            listed = torch.zeros(L, dtype=torch.bool)
            listed[whitelist] = True
            if int(counts[h]) >= int((protected[h] | listed).sum()):
                assert kept[h, whitelist].all(), (index, h)
            else:                                               # the budget wins: protected, then whitelisted
                assert not (kept[h] & ~protected[h] & ~listed).any(), (index, h)
        if allocation == "adakv":
            assert int(counts.sum()) == k.shape[1] * spec.n_kept(L)


@pytest.mark.parametrize("policy,allocation", PAIRS)
def test_fair_eviction_splits_each_heads_count_by_length(layers, tiny_model, policy, allocation):
    partitions = [(2, 15), (15, 33), (33, 43)]
    spans = covering_spans(partitions, L)
    fair = Compression(policy, 0.6, allocation=allocation, partitions=partitions, whitelist=[20, 21])
    plain = Compression(policy, 0.6, allocation=allocation, whitelist=[20, 21])
    fair_masks, plain_masks = kept_masks(fair, layers, tiny_model.inv_freq), kept_masks(plain, layers, tiny_model.inv_freq)
    for index, (q, k, v) in enumerate(layers):
        kept = fair_masks[index]
        counts = plain_masks[index].sum(-1)                                  # how many: the allocation's
        assert torch.equal(kept.sum(-1), counts)
        for h in range(k.shape[1]):
            assert [int(kept[h, s:e].sum()) for s, e in spans] == ref_quotas([e - s for s, e in spans], int(counts[h]))


@pytest.mark.parametrize("allocation", list(ALLOCATIONS))
def test_debias_zero_is_the_plain_policy(layers, allocation):
    plain = kept_masks(Compression("snapkv", 0.6, allocation=allocation), layers)
    zero = kept_masks(Compression("snapkv", 0.6, allocation=allocation, partitions=[(0, 20), (20, L)], debias=0.0), layers)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))


def test_policies_are_told_their_layer(tiny_model, monkeypatch):
    """A policy sees context.layer 0..n-1 with context.n_layers = n, for every row."""
    seen = []

    def depth(queries, keys, values, spans, context):
        seen.append((context.layer, context.n_layers))
        return torch.rand(1, keys.shape[1], keys.shape[2], generator=torch.Generator().manual_seed(context.layer))

    monkeypatch.setitem(POLICIES, "depth", depth)
    tokens = torch.randint(0, tiny_model.args.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    prefill(tiny_model, tiny_model.new_cache(2), tokens, Compression("depth", 0.5))
    n = tiny_model.args.n_layers
    assert seen == [(i, n) for _ in range(2) for i in range(n)]


def test_unknown_allocation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown allocation 'wedge'.*pyramid"):
        Compression("snapkv", 0.5, allocation="wedge")


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_adakv_with_snapkv_equals_the_reference_from_the_full_attention_matrix(layers, ratio):
    """End to end: the float64 SnapKV reference (full attention matrix) fed to the list-sorting AdaKV."""
    spec = Compression("snapkv", ratio, allocation="adakv")
    for (q, k, v), kept in zip(layers, kept_masks(spec, layers)):
        reference = ref_snapkv(q, k, [(0, L)])                                      # (H_kv, L) float64
        assert kept.sum(-1).tolist() == ref_adakv_counts(reference.tolist(), spec.n_kept(L))
