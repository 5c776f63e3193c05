"""policies.py (scores, selection, compress) against slow, obviously-correct references.

The references materialise the full causal attention matrix in float64 with explicit
loops over heads, from the queries and keys the model handed to the cache.
"""
import math

import pytest
import torch

import policies
from policies import (POLICIES, Compression, Context, covering_spans, h2o, knorm, proportional, snapkv,
                      streaming_llm, tova)
from reference import REPLAY, kept_masks, ref_attention, ref_h2o, ref_quotas, ref_snapkv

FIRST = Context(0, 1)   # the layer a direct policy call scores

L = 45


@pytest.fixture(scope="module")
def prefill(tiny_model):
    """Queries and keys of every layer after a system prefill of L tokens."""
    tokens = torch.randint(0, tiny_model.args.vocab_size, (1, L), generator=torch.Generator().manual_seed(5))
    cache = tiny_model.new_cache()
    cache.record_queries()
    tiny_model(tokens, cache)
    return tokens, [(q.clone(), cache.keys[i][:, :, :L].clone(), cache.values[i][:, :, :L].clone())
                    for i, q in enumerate(cache.queries)]


def ref_tova(q, k, spans):
    A = ref_attention(q, k)
    scores = torch.zeros(L, dtype=torch.float64)
    for s, e in spans:
        scores[s:e] = A[:, e - 1, s:e].mean(0)  # the anchor's row, averaged over all query heads
        scores[e - 1] = math.inf
    return scores.expand(k.shape[1], L)


def ref_knorm(k):
    return torch.stack([torch.tensor([-math.sqrt(sum(float(x) ** 2 for x in k[0, h, j])) for j in range(L)])
                        for h in range(k.shape[1])])


SPAN_SETS = {"plain": [(0, L)], "two": [(0, 20), (20, L)], "three": [(0, 9), (9, 30), (30, L)]}


def close(a, b):
    """Equal infinities, and finite scores within float32's rounding of the float64 reference: relative errors
    measured up to 3.1e-7 (4.8e-7 absolute on K-norms up to 7.3, 3.5e-8 on attention scores down to 1.6e-3), so
    rtol 4e-6 leaves 10x; H2O with its softmax rounded to float16 is off by 2.5e-4 relative (1e-5 absolute)."""
    a, b = a.double().reshape(b.shape), b.double()
    same_inf = torch.equal(a.isinf(), b.isinf())
    return same_inf and torch.allclose(a[a.isfinite()], b[b.isfinite()], atol=1e-9, rtol=4e-6)


@pytest.mark.parametrize("spans", list(SPAN_SETS))
def test_scores_equal_full_matrix_references(prefill, spans):
    spans = SPAN_SETS[spans]
    for q, k, v in prefill[1]:
        assert close(h2o(q, k, v, spans, FIRST), ref_h2o(q, k, spans))
        assert close(snapkv(q, k, v, spans, FIRST), ref_snapkv(q, k, spans))
        assert close(tova(q, k, v, spans, FIRST), ref_tova(q, k, spans))
        assert close(knorm(q, k, v, spans, FIRST), ref_knorm(k))


@pytest.mark.parametrize("block", [1, 7, L, 1000])
def test_h2o_blockwise_equals_full_matrix(prefill, block):
    q, k, v = prefill[1][0]
    assert close(h2o(q, k, v, [(0, L)], FIRST, block=block), ref_h2o(q, k, [(0, L)]))


def test_snapkv_window_longer_than_the_turn_shrinks(prefill):
    q, k, v = prefill[1][0]
    short = 10
    scores = snapkv(q[:, :, :short], k[:, :, :short], v[:, :, :short], [(0, short)], FIRST)
    assert scores[..., 1:].isinf().all() and scores[..., 0].isfinite().all()   # window of 9, one token scored


def test_streaming_llm_keeps_sinks_and_the_most_recent(prefill):
    q, k, v = prefill[1][0]
    n_kept = 20
    kept = streaming_llm(q, k, v, [(0, L)], FIRST)[0].topk(n_kept).indices.sort().values
    expected = torch.tensor(list(range(4)) + list(range(L - (n_kept - 4), L)))
    assert all(torch.equal(row, expected) for row in kept)


def compress(model, tokens, spec):
    """The cache and the compression's report; .kept holds the kept masks."""
    cache = model.new_cache()
    if spec.policy in policies.REPLAYS:    # KVzip scores a replay of the turn
        compressed = policies.prefill(model, cache, tokens, spec, replay=REPLAY)
    else:
        cache.record_queries()             # queries only: H2O scores by its own pass, as the references do
        model(tokens, cache)
        compressed = policies.compress(cache, spec)
    cache.kept = compressed.kept
    return cache, compressed.reports[0]


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full" and p not in policies.REPLAYS])  # test_kvzip
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_kept_entries_per_layer_and_head(tiny_model, prefill, policy, ratio):
    tokens, layers = prefill
    cache, report = compress(tiny_model, tokens, Compression(policy, ratio))
    n_kept = int(L * (1 - ratio))
    assert report["n_kept"] == n_kept and cache.lengths == [n_kept] * len(layers)
    for layer, (q, k, v) in enumerate(layers):
        kept = cache.kept[layer][0]                                      # (H_kv, L)
        assert (kept.sum(1) == n_kept).all()
        scores = POLICIES[policy](q, k, v, [(0, L)], Context(layer, len(layers), inv_freq=tiny_model.inv_freq))[0]
        for h in range(kept.shape[0]):
            index = kept[h].nonzero()[:, 0]
            assert torch.equal(cache.keys[layer][0, h, :n_kept], k[0, h, index])   # gathered in sorted order
            best = scores[h].topk(n_kept).values                         # the kept set is a top-k set (ties aside)
            got = scores[h, index].sort(descending=True).values
            assert torch.equal(got.isinf(), best.isinf())
            assert torch.allclose(got[got.isfinite()], best[best.isfinite()])
    assert all(k.shape[2] <= n_kept + 64 for k in cache.keys)           # memory really shrinks


@pytest.mark.parametrize("policy", ["streaming_llm", "snapkv", "tova", "expected_attention"])
def test_protected_tokens_are_kept(tiny_model, prefill, policy):
    cache, _ = compress(tiny_model, prefill[0], Compression(policy, 0.5))
    protected = {"streaming_llm": range(4), "snapkv": range(L - 16, L), "tova": [L - 1],
                 "expected_attention": range(4)}[policy]
    for kept in cache.kept:
        assert kept[0][:, list(protected)].all()


def test_whitelist_is_kept_within_the_budget(tiny_model, prefill):
    whitelist = [10, 11, 12, 13]
    for policy in (p for p in POLICIES if p != "full"):
        cache, report = compress(tiny_model, prefill[0], Compression(policy, 0.5, whitelist=whitelist))
        assert report["whitelist_kept"] == 1.0 and report["n_kept"] == int(L * 0.5)
        assert all(k[0][:, whitelist].all() for k in cache.kept)


def test_whitelist_larger_than_budget_keeps_budget_and_reports(tiny_model, prefill):
    whitelist = list(range(5, 25))                                       # 20 tokens, budget 4
    cache, report = compress(tiny_model, prefill[0], Compression("knorm", 0.9, whitelist=whitelist))
    assert report["n_kept"] == 4 and cache.lengths == [4] * len(cache.kept)
    assert report["whitelist_kept"] == pytest.approx(4 / 20)
    assert all(k[0][:, whitelist].sum(1).eq(4).all() for k in cache.kept)  # every kept entry is whitelisted


def test_proportional_is_the_papers_split():
    """Two spans: the earlier floor(b len / L), the later the rest (PAPER.md, Algorithm 1); more: cumulative floors."""
    assert proportional(torch.tensor([70, 95]), 82).tolist() == [34, 48]      # 34.8 -> 34 (largest remainder: 35)
    assert proportional(torch.tensor([[70, 95], [1, 2]]), torch.tensor([[82], [2]])).tolist() == [[34, 48], [0, 2]]
    assert proportional(torch.tensor([10, 25, 10]), 20).tolist() == [4, 11, 5]  # floors of 4.4, 15.6, 20
    for lengths in ([40, 125], [3, 3, 3], [1, 50, 7, 12], [164, 1]):
        for total in range(sum(lengths) + 1):
            assert proportional(torch.tensor(lengths), total).tolist() == ref_quotas(lengths, total)
    assert proportional(torch.tensor([17.5, 30.5]), 48).tolist() == [17, 31]   # a debias blend: float weights


def test_covering_spans_assign_head_tail_and_gaps():
    assert covering_spans([(3, 10), (12, 20)], 25) == [(0, 12), (12, 25)]
    with pytest.raises(ValueError):
        covering_spans([(3, 10), (8, 20)], 25)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.8])
def test_fair_eviction_gives_equal_keep_rates(tiny_model, prefill, policy, ratio):
    partitions = [(2, 15), (15, 33), (33, 43)]                          # head and tail go to first/last
    spans = covering_spans(partitions, L)
    whitelist = [20, 21]
    cache, report = compress(tiny_model, prefill[0], Compression(policy, ratio, partitions=partitions,
                                                                  whitelist=whitelist))
    n_kept = report["n_kept"]
    quotas = ref_quotas([e - s for s, e in spans], n_kept)
    for kept in cache.kept:
        for h in range(kept.shape[1]):
            for (s, e), quota in zip(spans, quotas):
                count = int(kept[0, h, s:e].sum())
                assert count == quota
                assert abs(count - (e - s) * n_kept / L) <= 1           # within one token of equal rate


def test_debias_interpolates_between_plain_and_fair(tiny_model, prefill):
    partitions = [(0, 15), (15, L)]
    plain, _ = compress(tiny_model, prefill[0], Compression("streaming_llm", 0.6))
    zero, _ = compress(tiny_model, prefill[0], Compression("streaming_llm", 0.6, partitions=partitions, debias=0.0))
    fair, _ = compress(tiny_model, prefill[0], Compression("streaming_llm", 0.6, partitions=partitions))
    half, _ = compress(tiny_model, prefill[0], Compression("streaming_llm", 0.6, partitions=partitions, debias=0.5))
    assert all(torch.equal(a, b) for a, b in zip(plain.kept, zero.kept))
    first = lambda c: int(c.kept[0][0, 0, :15].sum())
    assert first(plain) < first(half) < first(fair)                      # recency starves the early span


def test_bad_specs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown policy 'nope'.*snapkv"):
        Compression("nope", 0.5)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="outside"):
            Compression("tova", bad)
    with pytest.raises(ValueError, match="snapkv has no option 'windw' \\(its options: window, kernel\\)"):
        Compression("snapkv", 0.5, options={"windw": 8})            # a misspelled option: not a TypeError later
    with pytest.raises(ValueError, match="adakv has no option 'alpah'"):
        Compression("knorm", 0.5, allocation="adakv", allocation_options={"alpah": 0.1})


@pytest.mark.parametrize("policy", ["tova", "snapkv", "h2o"])
def test_whitelist_larger_than_budget_keeps_the_best_scored_whitelisted(policy):
    """Half the tokens whitelisted, budget below that: exactly the best-scored whitelisted tokens stay.

    Attention-sized scores (1e-6 .. 1e-3) must not collapse into ties when the whitelist is
    ranked above the rest (issue: a constant lift in float32 did that at L = 2,000).
    """
    n, heads, kv_heads, dim = 2000, 4, 2, 16
    for trial in range(20):
        g = torch.Generator().manual_seed(trial)
        q = torch.randn(1, heads, n, dim, generator=g)
        k = torch.randn(1, kv_heads, n, dim, generator=g)
        whitelist = sorted(torch.randperm(n, generator=g)[:n // 2].tolist())
        spec = Compression(policy, 0.8, whitelist=whitelist)
        kept = [row.nonzero()[:, 0] for row in kept_masks(spec, [(q, k, k)])[0]]   # per KV head, sorted
        scores = POLICIES[policy](q, k, k, [(0, n)], FIRST)[0]                   # (H_kv, n)
        budget = spec.n_kept(n)
        for h in range(kv_heads):
            protected = (scores[h] == math.inf).nonzero()[:, 0].tolist()        # sinks, windows, anchors
            listed = [p for p in whitelist if p not in protected]
            best = sorted(listed, key=lambda p: float(scores[h, p]), reverse=True)[:budget - len(protected)]
            expected = sorted(float(scores[h, p]) for p in best)
            chosen = [p for p in kept[h].tolist() if p not in protected]
            assert set(protected) <= set(kept[h].tolist()) and set(chosen) <= set(listed), (trial, h)
            assert sorted(float(scores[h, p]) for p in chosen) == expected, (trial, h)  # ties may swap positions


def test_explain_reports_what_each_layer_ranked(tiny_model, prefill):
    """Why a token went: per layer the positions, the policy's scores, each KV head's count and the kept set."""
    tokens, layers = prefill
    spec = Compression("snapkv", 0.5, allocation="adakv", whitelist=[10, 11])
    compressed = policies.prefill(tiny_model, tiny_model.new_cache(), tokens, spec, explain=True)
    explained = compressed.explained[0]
    assert [e["layer"] for e in explained] == list(range(len(layers)))
    for e, (q, k, v), kept in zip(explained, layers, compressed.kept):
        assert torch.equal(e["positions"], torch.arange(L).expand(k.shape[1], L))
        assert close(e["scores"], snapkv(q, k, v, [(0, L)], FIRST))           # the scores it ranked
        assert torch.equal(e["kept"], kept[0]) and torch.equal(e["counts"], kept[0].sum(-1))
        assert (e["tier"][:, [10, 11]] >= 1).all()                          # whitelisted (or protected)


@pytest.mark.parametrize("policy,options,message", [
    ("snapkv", {"window": 0}, "snapkv needs window >= 1"), ("snapkv", {"window": -1}, "snapkv needs window >= 1"),
    ("snapkv", {"kernel": 4}, "an odd kernel"), ("streaming_llm", {"n_sink": -1}, "n_sink >= 0"),
    ("h2o", {"block": 0}, "block >= 1"), ("expected_attention", {"n_future": 0}, "n_future >= 1"),
    ("kvzip", {"chunk_size": 0}, "chunk_size >= 1")])
def test_a_policy_refuses_options_it_cannot_work_with(prefill, policy, options, message):
    """Before this check, window=0 silently turned SnapKV into a recency rule and n_sink=-1 made
    StreamingLLM drop position 0; flags.py tries every option this way before anything loads."""
    q, k, v = prefill[1][0]
    with pytest.raises(ValueError, match=message):
        POLICIES[policy](q, k, v, [(0, L)], Context(0, 1, torch.rand(1, k.shape[1], L), None), **options)


@pytest.mark.parametrize("allocation,options,message", [
    ("pyramid", {"beta": 0}, "beta >= 1"), ("pyramid", {"window": -1}, "window >= 0"),
    ("adakv", {"alpha": 1.5}, "0 <= alpha <= 1"), ("global", {"n_sink": -1}, "n_sink >= 0")])
def test_an_allocation_refuses_options_it_cannot_work_with(allocation, options, message):
    plain = [lambda: (torch.rand(2, 10), None)]
    with pytest.raises(ValueError, match=message):
        policies.ALLOCATIONS[allocation](plain, torch.full((1, 2), 10), 5.0, 0.5, **options)
