"""Compression during decoding (decoding.Decoding, decoding.Cuts) against a naive reference.

The reference decodes one token at a time with a plain float64 forward over the whole sequence,
in which every query sees the keys at or before its position that no cut had evicted when it
ran; every `interval` decode forwards it re-scores each layer's whole cache (what each KV head
still holds, in position order) with the policy, keeps each head's best by sorting (as many as the
allocation's rule, written out with lists, gives it: reference_counts), and hides the rest from every
later query. Scores that tie within rounding are settled as the fast path did (reference_cut), and
only inside the tie. Nothing of cache.py's buffers, gathering, masks or query
buffer is used. The fast path must keep the same positions at every cut and generate the same
tokens, for every policy and allocation, at batch 1 and in ragged batches where rows finish early.
"""
import math

import pytest
import torch

from decoding import DECODE, Cuts, Decoding
from model import apply_rope, generate, rope_cos_sin
from reference import forward64, ref_adakv_counts, ref_global_counts, ref_pyramid_budget
from policies import ALLOCATIONS, POLICIES, Compression, Context

INF = math.inf
TARGET, INTERVAL = 12, 8
OPTIONS = {"snapkv": {"window": 4}}
PAIRS = [(p, a) for p in DECODE for a in ALLOCATIONS]


def spec_for(policy, allocation, rerotate=False, **more):
    compression = Compression(policy, allocation=allocation, options=OPTIONS.get(policy, {}), **more)
    return Decoding(compression, TARGET, interval=INTERVAL, buffer=INTERVAL, rerotate=rerotate)


def generate_logged(model, cache, tokens, max_new_tokens, spec, **kwargs):
    """generate() with decode cuts; returns the answers and the Cuts (its log holds every cut)."""
    cuts = Cuts(spec, log=True)
    return generate(model, cache, tokens, max_new_tokens, cuts=cuts, **kwargs), cuts


# ----------------------------------------------------------------------------- the naive reference

def reference_scores(spec, layer_index, n_layers, q, k, v, held):
    """Each KV head's scores of what it holds (a list per head): heads holding the same tokens in one call."""
    H_kv = k.shape[0]
    same = all(held[h] == held[0] for h in range(H_kv))
    groups = [list(range(H_kv))] if same else [[h] for h in range(H_kv)]
    group = q.shape[0] // H_kv
    c = spec.compression
    scores = {}
    for heads in groups:
        pos = torch.tensor(held[heads[0]])
        query_heads = [h * group + g for h in heads for g in range(group)]
        s = POLICIES[c.policy](q[query_heads][:, pos][None].float(), k[heads][:, pos][None].float(),
                               v[heads][:, pos][None].float(), [(0, len(pos))], Context(layer_index, n_layers),
                               **c.options)[0]
        for j, h in enumerate(heads):
            scores[h] = s[j].tolist()
    return [scores[h] for h in range(H_kv)]


def reference_counts(spec, scores, held):
    """The allocation's count per (layer, KV head) at a cut (ratio None), by its rule written out with lists:
    uniform the target; PyramidKV kvpress's layer budget for a mean of the target over the most a head of the
    layer holds; AdaKV and the global budget by sorting every entry (reference.ref_shared_counts)."""
    c, target, n_layers = spec.compression, spec.target, len(held)
    options = c.allocation_options
    if c.allocation == "uniform":
        return [[max(1, target)] * len(layer_held) for layer_held in held]
    if c.allocation == "pyramid":
        return [[max(1, ref_pyramid_budget(max(len(p) for p in layer_held), target, i, n_layers, **options))]
                * len(layer_held) for i, layer_held in enumerate(held)]
    if c.allocation == "adakv":
        return [ref_adakv_counts(layer_scores, max(1, target), **options) for layer_scores in scores]
    assert c.allocation == "global" and not options.get("layerwise"), c.allocation   # a new allocation: add its rule
    return ref_global_counts(scores, target, options.get("n_sink", 4))


def reference_cut(scores, counts, held, fast_kept=None):
    """Each KV head's kept positions: its `counts[h]` best by sorting.

    Scores equal within rounding at the boundary (K-norm: a token repeated at two positions
    has one key norm in layer 0) are decided by rounding noise, in float32 as in float64: there
    the fast path's choice (`fast_kept`) is taken if it differs only inside that tie.
    """
    H_kv = len(held)
    kept = []
    for h in range(H_kv):
        order = sorted(range(len(held[h])), key=lambda j: -scores[h][j])
        n = min(counts[h], len(held[h]))
        chosen = {held[h][j] for j in order[:n]}
        boundary = scores[h][order[n - 1]] if n else INF
        if fast_kept is not None and math.isfinite(boundary) and set(fast_kept[h]) != chosen:
            tie = {held[h][j] for j in order if abs(scores[h][j] - boundary) <= 1e-5 * abs(boundary)}
            fast = set(fast_kept[h])
            if len(fast) == n and chosen - tie <= fast and fast - chosen <= tie:
                chosen = fast
        kept.append(sorted(chosen))
    return kept


def reference_generate(model, prompt, max_new_tokens, spec, stop_ids=(), fast_cuts=None):
    """One row, one token at a time, every forward over the whole sequence in float64. Returns (tokens, cuts).

    fast_cuts: the fast path's cuts of this row, only to settle ties within rounding (reference_cut).
    """
    a = model.args
    big = 10 ** 9
    fast = {(layer, step): kept for layer, step, kept in fast_cuts or []}
    seen_until = [torch.full((a.n_kv_heads, len(prompt) + max_new_tokens), big) for _ in range(a.n_layers)]
    seq, answer, cuts, count = list(prompt), [], [], 0
    logits, _ = forward64(model, seq, seen_until)
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        if token in stop_ids:
            break
        answer.append(token)
        if step + 1 == max_new_tokens:
            break
        seq.append(token)
        count += 1                                                               # decode forward number step + 1
        logits, layers = forward64(model, seq, seen_until)
        if count == spec.interval:
            now = len(seq) - 1
            held = [[[p for p in range(now + 1) if seen_until[i][h][p] == big] for h in range(a.n_kv_heads)]
                    for i in range(a.n_layers)]
            scores = [reference_scores(spec, i, a.n_layers, q, k, v, held[i]) for i, (q, k, v, _) in enumerate(layers)]
            counts = reference_counts(spec, scores, held)
            for i in range(a.n_layers):
                kept = reference_cut(scores[i], counts[i], held[i], fast.get((i, step + 1)))
                for h in range(a.n_kv_heads):
                    for p in set(held[i][h]) - set(kept[h]):
                        seen_until[i][h][p] = now                                # later queries no longer see it
                cuts.append((i, step + 1, kept))
            count = 0
    return answer, cuts


def reference_kept_at_end(cuts, prompt_len, n_layers, kv_heads):
    """Per prompt position, the share of KV heads still holding it at the end, averaged over layers, from the
    reference's cuts: what a head holds of the prompt is what its layer's last cut kept (all of it if none)."""
    last = {layer: kept for layer, _, kept in cuts}                             # cuts come in step order
    shares = []
    for p in range(prompt_len):
        holding = [sum(p in last[layer][h] if layer in last else True for h in range(kv_heads)) / kv_heads
                   for layer in range(n_layers)]
        shares.append(sum(holding) / n_layers)
    return torch.tensor(shares)


def fast_cuts(cuts, row):
    return [(c["layer"], c["step"], c["kept"][row]) for c in cuts.log if c["kept"][row] is not None]


# ----------------------------------------------------------------------------- fast path == reference

def prompt_of(length, seed):
    """Distinct tokens: a repeated token has one key norm in layer 0, a tie K-norm breaks by rounding."""
    return torch.randperm(96, generator=torch.Generator().manual_seed(seed))[:length].tolist()


@pytest.mark.parametrize("policy,allocation", PAIRS)
def test_batch_of_one_matches_reference(tiny_model, policy, allocation):
    prompt = prompt_of(15, 1)
    spec = spec_for(policy, allocation)
    answers, logged = generate_logged(tiny_model, tiny_model.new_cache(), torch.tensor([prompt]), 30, spec, stop_ids=())
    expected, cuts = reference_generate(tiny_model, prompt, 30, spec, fast_cuts=fast_cuts(logged, 0))
    assert len(cuts) == 3 * tiny_model.args.n_layers
    assert fast_cuts(logged, 0) == cuts
    assert answers[0] == expected
    a = tiny_model.args
    assert torch.equal(logged.kept_at_end[0], reference_kept_at_end(cuts, len(prompt), a.n_layers, a.n_kv_heads).float())


@pytest.mark.parametrize("policy,allocation", PAIRS)
def test_ragged_batch_matches_each_row_alone(tiny_model, policy, allocation):
    """Rows of different prompt lengths (right-padded), one finishing early: each equals its own reference."""
    prompts = [prompt_of(n, 10 + n) for n in (17, 9, 13)]
    spec = spec_for(policy, allocation)
    tokens = torch.zeros(3, 17, dtype=torch.long)
    real = torch.zeros(3, 17, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)], real[b, :len(p)] = torch.tensor(p), True
    unstopped, _ = generate_logged(tiny_model, tiny_model.new_cache(3), tokens, 30, spec, real=real, stop_ids=())
    stop = next((t,) for t in unstopped[0][2:13] if t not in unstopped[1] + unstopped[2])   # stops row 0 only
    answers, logged = generate_logged(tiny_model, tiny_model.new_cache(3), tokens, 30, spec, real=real, stop_ids=stop)
    for b, p in enumerate(prompts):
        expected, cuts = reference_generate(tiny_model, p, 30, spec, stop_ids=stop, fast_cuts=fast_cuts(logged, b))
        assert fast_cuts(logged, b) == cuts, f"row {b}"
        assert answers[b] == expected, f"row {b}"
        a = tiny_model.args                         # what the row held when it left (row 0) or at the end
        assert torch.equal(logged.kept_at_end[b], reference_kept_at_end(cuts, len(p), a.n_layers, a.n_kv_heads).float()), \
            f"row {b}"
    assert len(answers[0]) < 13 and len(answers[1]) == len(answers[2]) == 30   # row 0 left between two cuts

def test_no_cut_before_the_interval_and_counters_reset_without_eviction(tiny_model):
    """Cuts come at decode forwards interval, 2 interval, ...; a cache within the target keeps everything."""
    prompt = prompt_of(5, 3)
    _, cuts = generate_logged(tiny_model, tiny_model.new_cache(), torch.tensor([prompt]), 2 * INTERVAL + 1,
                              Decoding(Compression("knorm"), 100, interval=INTERVAL, buffer=INTERVAL), stop_ids=())
    assert sorted({c["step"] for c in cuts.log}) == [INTERVAL, 2 * INTERVAL]
    last = [c for c in cuts.log if c["step"] == 2 * INTERVAL][0]
    assert last["kept"][0][0] == list(range(5 + 2 * INTERVAL))                  # prompt + every decoded token


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("policy", ["knorm", "tova"])
def test_entries_per_head_stay_bounded_and_capacity_does_not_grow(tiny_model, policy, monkeypatch):
    seen = []
    original = Cuts.after_forward

    def watched(self, cache, step):
        original(self, cache, step)
        held = max(int(v[:, :, :n].sum(-1).max()) for v, n in zip(cache.valid, cache.lengths))
        seen.append((step, held, max(k.shape[2] for k in cache.keys)))
    monkeypatch.setattr(Cuts, "after_forward", watched)
    tokens = torch.tensor([prompt_of(30, 4), prompt_of(30, 5)])
    generate(tiny_model, tiny_model.new_cache(2), tokens, 100, stop_ids=(), cuts=Cuts(spec_for(policy, "uniform")))
    after_first = [s for s in seen if s[0] >= INTERVAL]
    assert max(h for _, h, _ in after_first) == TARGET + INTERVAL - 1
    assert {c for _, _, c in after_first} == {TARGET + INTERVAL}                # one capacity from the first cut on


# ----------------------------------------------------------------------------- remedies

def test_whitelist_is_never_evicted_and_fair_partitions_keep_equal_fractions(tiny_model):
    prompt = prompt_of(24, 6)
    whitelist = [5, 6, 7, 8, 9]
    _, cuts = generate_logged(tiny_model, tiny_model.new_cache(), torch.tensor([prompt]), 40,
                              spec_for("knorm", "uniform", whitelist=whitelist), stop_ids=())
    assert cuts.log and all(set(whitelist) <= set(kept) for c in cuts.log for kept in c["kept"][0])
    _, cuts = generate_logged(tiny_model, tiny_model.new_cache(), torch.tensor([prompt]), 9,
                              spec_for("knorm", "uniform", partitions=[(0, 12), (12, 20)]), stop_ids=())
    for cut in cuts.log:                        # 24 prompt (12 + 8 + 4 user turn) + 8 answer = 32 -> 12
        for kept in cut["kept"][0]:
            sizes = [sum(1 for p in kept if lo <= p < hi) for lo, hi in [(0, 12), (12, 24), (24, 32)]]
            assert sizes == [4, 5, 3]                # 12 x (12, 24, 32) / 32 = 4.5, 9, 12: floors 4, 9, 12 (the paper's)


def test_whitelist_larger_than_target_is_refused():
    with pytest.raises(ValueError, match="must exceed the 12 whitelisted"):
        Decoding(Compression("knorm", whitelist=list(range(12))), 12)


@pytest.mark.parametrize("kwargs,message", [
    (dict(policy="knorm", target=0), "target must be an integer >= 1"),
    (dict(policy="knorm", target=8, interval=0), "interval must be an integer >= 1"),
    (dict(policy="knorm", target=8, buffer=0), "buffer must be an integer >= 1"),
    (dict(policy="h2o", target=8), "reads the query of every cached token"),
    (dict(policy="expected_attention", target=8), "reads the query of every cached token"),
    (dict(policy="full", target=8), "evicts nothing"),
    (dict(policy="snapkv", target=8, buffer=8), "reads the last 16 queries, but a decode cut sees 8"),
    (dict(policy="snapkv", target=8, interval=4), "reads the last 16 queries, but a decode cut sees 4"),
    (dict(policy="knorm", target=8, allocation="nope"), "unknown allocation"),
])
def test_bad_decoding_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Decoding(Compression(kwargs.pop("policy"), allocation=kwargs.pop("allocation", "uniform")), **kwargs)


# ----------------------------------------------------------------------------- re-rotation

@pytest.mark.parametrize("allocation", ["uniform", "adakv"])
def test_rerotated_keys_equal_keys_computed_at_the_new_positions(tiny_model, allocation):
    """After each cut the kept keys sit at 0 .. n-1 (fp32 within 1e-5 of RoPE applied there), and decoding continues at n."""
    pre_rope = {i: [] for i in range(tiny_model.args.n_layers)}               # each token's key before RoPE
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, i, out, n=n: pre_rope[n].append(out))
             for n, layer in enumerate(tiny_model.layers)]
    try:
        cache = tiny_model.new_cache()
        _, cuts = generate_logged(tiny_model, cache, torch.tensor([prompt_of(20, 7)]), 2 * INTERVAL + 1,
                                  spec_for("knorm", allocation, rerotate=True), stop_ids=())
    finally:
        for hook in hooks:
            hook.remove()
    a = tiny_model.args
    assert {c["step"] for c in cuts.log} == {INTERVAL, 2 * INTERVAL}
    for layer in range(a.n_layers):
        k = torch.cat(pre_rope[layer], 1)[0].view(-1, a.n_kv_heads, a.head_dim).transpose(0, 1)   # (H_kv, n, D)
        kept = [c for c in cuts.log if c["layer"] == layer][-1]["kept"][0]
        for h, positions in enumerate(kept):
            n = len(positions)
            cos, sin = rope_cos_sin(tiny_model.inv_freq, torch.arange(n)[None], torch.float32)
            expected = apply_rope(k[h, positions][None, None], cos, sin)[0, 0]
            assert torch.allclose(cache.keys[layer][0, h, :n], expected, atol=1e-5, rtol=0)
            assert cache.positions[layer][0, h, :n].tolist() == positions
    assert int(cache.next_rotary[0]) == max(len(p) for c in cuts.log for p in c["kept"][0])


def test_explain_reports_what_each_cut_ranked(tiny_model):
    """Per cut: the positions each head held, the scores ranked, each head's count, and the kept set, which is
    each head's top count by score; K-norm's scores are minus the norms of the keys the cache keeps."""
    prompt = prompt_of(20, 8)
    cuts = Cuts(spec_for("knorm", "adakv"), log=True, explain=True)
    cache = tiny_model.new_cache()
    generate(tiny_model, cache, torch.tensor([prompt]), 2 * INTERVAL + 1, stop_ids=(), cuts=cuts)
    for cut in cuts.log:
        e = cut["explained"][0]
        kept = [sorted(e["positions"][h][e["kept"][h]].tolist()) for h in range(len(e["counts"]))]
        assert kept == cut["kept"][0] and [len(p) for p in kept] == e["counts"].tolist()
        assert int(e["counts"].sum()) == TARGET * len(e["counts"])          # adakv: the layer's total
        for h, count in enumerate(e["counts"].tolist()):
            held = e["positions"][h] >= 0
            best = e["scores"][h][held].topk(count).values
            assert torch.equal(e["scores"][h][e["kept"][h]].sort(descending=True).values, best)
    for layer in range(tiny_model.args.n_layers):                         # the last cut's kept keys are still held
        e = [c for c in cuts.log if c["layer"] == layer][-1]["explained"][0]
        for h in range(tiny_model.args.n_kv_heads):
            positions = e["positions"][h][e["kept"][h]]
            slots = [cache.positions[layer][0, h].tolist().index(p) for p in positions.tolist()]
            norms = cache.keys[layer][0, h, slots].norm(dim=-1)
            assert torch.allclose(e["scores"][h][e["kept"][h]], -norms)
