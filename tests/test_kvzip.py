"""KVzip (policies.kvzip, the replay in policies.replay_turns) and the `global` allocation against a float64
reference built by hand on a tiny random model.

The reference writes the replay out itself: for each chunk of the turn, the sequence turn + prompt + suffix
+ chunk goes through a plain float64 forward (no cache); for every layer and query head, the replay's
queries attend to the sinks, the chunk and the replay (causally) with a softmax over exactly those keys;
KVzip+ divides each query's row by the norm of its hidden state and multiplies each key's column by
||W_O v||; a key's score is the maximum over the replay's queries and its group's heads. Selection is by
sorting Python lists. Nothing of cache.py, the replay code or the selection is used.
"""
import math

import pytest
import torch

from model import generate
from policies import ALLOCATIONS, Compression, Replay, prefill, replay_turns
from reference import forward64

PROMPT, LATER, SUFFIX = [11, 12, 13, 14], [21, 22, 23], [31, 32]
START = 3                                           # the template's header: positions 0 .. 2, never replayed


def turn_of(length, seed):
    return torch.randint(40, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def ref_chunks(turn, size):
    """(first, end, replay tokens) of each pass, as kvpress 0.5.5's KVzipPress.prepare builds them."""
    context = turn[START:]
    pieces = [context[i:i + size] for i in range(0, len(context), size)]
    out, first = [], START
    for j, piece in enumerate(pieces):
        prompt = PROMPT if j == 0 else LATER + pieces[j - 1][-8:]
        out.append((first, first + len(piece), prompt + SUFFIX + piece))
        first += len(piece)
    return out


def ref_scores(model, turn, size=2048, n_sink=4, plus=False):
    """(n_layers, H_kv, L) float64: the most attention each key of the turn gets from the replay; sinks +inf."""
    a, L = model.args, len(turn)
    group = a.n_heads // a.n_kv_heads
    scores = torch.zeros(a.n_layers, a.n_kv_heads, L, dtype=torch.float64)
    for first, end, replay in ref_chunks(turn, size):
        n = len(replay)
        _, layers = forward64(model, turn + replay)
        for i, (q, k, v, x) in enumerate(layers):
            sink = min(n_sink, first)
            columns = list(range(sink)) + list(range(first, end)) + list(range(L, L + n))
            W = model.layers[i].self_attn.o_proj.weight.double()                      # (dim, H * D)
            for h in range(a.n_heads):
                kv = h // group
                for t in range(n):
                    logits = torch.tensor([float(q[h, L + t] @ k[kv, c]) / math.sqrt(a.head_dim)
                                           if c < L or c - L <= t else -math.inf for c in columns])
                    p = logits.softmax(0)
                    if plus:
                        head = W[:, h * a.head_dim:(h + 1) * a.head_dim]
                        written = torch.stack([(head @ v[kv, c]).norm() for c in columns])
                        p = p / x[L + t].norm() * written
                    for j, c in enumerate(range(first, end)):
                        scores[i, kv, c] = max(float(scores[i, kv, c]), float(p[sink + j]))
    scores[..., :n_sink] = math.inf
    return scores


def ref_kept(scores, spec, L):
    """Per layer, per KV head, the set of kept positions: uniform's n_kept best, or global's shared count."""
    n_layers, kv_heads = scores.shape[:2]
    entries = [(float(scores[i, h, p]), i, h, p) for i in range(n_layers) for h in range(kv_heads) for p in range(L)]
    if spec.allocation == "uniform":
        n = spec.n_kept(L)
        best = {(i, h): sorted((e for e in entries if e[1:3] == (i, h)), reverse=True)[:n]
                for i in range(n_layers) for h in range(kv_heads)}
        chosen = [e for group in best.values() for e in group]
    else:
        groups = [[e for e in entries if e[1] == i] for i in range(n_layers)] if spec.allocation_options.get(
            "layerwise") else [entries]
        chosen = []
        for group in groups:
            keep = len(group) - int(len(group) * spec.ratio)                       # kvpress: N - int(N r) kept
            chosen += sorted(group, reverse=True)[:keep]
    return [[sorted(p for _, i2, h2, p in chosen if (i2, h2) == (i, h)) for h in range(kv_heads)]
            for i in range(n_layers)]


def fast_kept(model, turns, spec, size=2048):
    """Kept positions per row, layer and head, from policies.prefill on a right-padded batch of turns."""
    width = max(map(len, turns))
    tokens = torch.zeros(len(turns), width, dtype=torch.long)
    real = torch.arange(width)[None] < torch.tensor([len(t) for t in turns])[:, None]
    for b, t in enumerate(turns):
        tokens[b, :len(t)] = torch.tensor(t)
    cache = model.new_cache(len(turns))
    compressed = prefill(model, cache, tokens, spec, real=real, replay=Replay(START, PROMPT, LATER, SUFFIX))
    return [[[m[b, h, :len(t)].nonzero()[:, 0].tolist() for h in range(m.shape[1])] for m in compressed.kept]
            for b, t in enumerate(turns)], cache


SPECS = [Compression("kvzip", 0.5), Compression("kvzip", 0.75, allocation="global"),
         Compression("kvzip", 0.6, allocation="global", allocation_options={"layerwise": True}),
         Compression("kvzip", 0.5, options={"plus": True}), Compression("kvzip", 0.5, options={"chunk_size": 8})]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.allocation}{s.allocation_options}{s.options}")
def test_kept_sets_equal_the_float64_reference(tiny_model, spec):
    turn = turn_of(26, 1)
    scores = ref_scores(tiny_model, turn, size=spec.options.get("chunk_size", 2048),
                        plus=spec.options.get("plus", False))
    kept, _ = fast_kept(tiny_model, [turn], spec)
    assert kept[0] == ref_kept(scores, spec, len(turn))


@pytest.mark.parametrize("allocation", list(ALLOCATIONS))
def test_ragged_batch_rows_replay_their_own_turns(tiny_model, allocation):
    """Three turns of different lengths (several chunks each): each row keeps what it keeps alone."""
    turns = [turn_of(n, 10 + n) for n in (30, 17, 24)]
    spec = Compression("kvzip", 0.5, allocation=allocation, options={"chunk_size": 9})
    batch, _ = fast_kept(tiny_model, turns, spec)
    for b, turn in enumerate(turns):
        alone, _ = fast_kept(tiny_model, [turn], spec)
        assert batch[b] == alone[0], b
    if allocation == "uniform":                                                    # and the reference's
        assert batch[1] == ref_kept(ref_scores(tiny_model, turns[1], size=9), spec, 17)


def test_fair_eviction_splits_the_same_scores(tiny_model):
    """KVzip's scores do not depend on spans: fair eviction keeps each partition's best by those scores."""
    turn = turn_of(26, 2)
    spec = Compression("kvzip", 0.5, partitions=[(0, 12), (12, 26)])
    scores = ref_scores(tiny_model, turn)
    kept, _ = fast_kept(tiny_model, [turn], spec)
    n = spec.n_kept(26)
    for layer, heads in enumerate(kept[0]):
        for h, positions in enumerate(heads):
            for (s, e), quota in zip([(0, 12), (12, 26)], [6, 7]):                 # 13 x 12/26, 13 x 14/26
                part = sorted(range(s, e), key=lambda p: -float(scores[layer, h, p]))[:quota]
                assert sorted(p for p in positions if s <= p < e) == sorted(part)
            assert len(positions) == n


def test_the_cached_turn_is_bit_identical_after_the_replay_and_its_entries_are_gone(tiny_model):
    turns = [turn_of(20, 3), turn_of(14, 4)]
    tokens = torch.zeros(2, 20, dtype=torch.long)
    real = torch.arange(20)[None] < torch.tensor([[20], [14]])
    for b, t in enumerate(turns):
        tokens[b, :len(t)] = torch.tensor(t)
    cache = tiny_model.new_cache(2)
    cache.record_queries()
    tiny_model(tokens, cache, real)
    before = cache.checkpoint()
    replay_turns(tiny_model, cache, turns, [Compression("kvzip", 0.5, options={"chunk_size": 6})] * 2,
                 [Replay(START, PROMPT, LATER, SUFFIX)] * 2)
    after = cache.checkpoint()
    assert after["lengths"] == before["lengths"] == [20] * tiny_model.args.n_layers
    for name in ("keys", "values", "valid", "positions"):
        assert all(torch.equal(x, y) for x, y in zip(before[name], after[name])), name
    assert torch.equal(before["next_position"], after["next_position"])
    assert all(torch.equal(x, y) for x, y in zip(before["queries"], after["queries"]))


def test_global_budget_counts_as_kvpress_and_memory_follows(tiny_model):
    """N - int(N r) entries in all (not n_layers H_kv max(1, int(L (1 - r)))); each layer's buffers are sized by
    its largest head, and heads keep different counts."""
    turn = turn_of(25, 5)
    spec = Compression("kvzip", 0.75, allocation="global")
    kept, cache = fast_kept(tiny_model, [turn], spec)
    a = tiny_model.args
    total = a.n_layers * a.n_kv_heads * 25
    assert sum(len(p) for heads in kept[0] for p in heads) == total - int(total * 0.75)
    assert a.n_layers * a.n_kv_heads * spec.n_kept(25) != total - int(total * 0.75)  # 4 x 6 = 24 vs 25
    assert cache.lengths == [max(len(p) for p in heads) for heads in kept[0]]
    assert all(p[:4] == [0, 1, 2, 3] for heads in kept[0] for p in heads)        # the sinks, in every head
    assert len({len(p) for heads in kept[0] for p in heads}) > 1                  # heads keep different counts


def test_kvzip_without_a_replay_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="replay"):
        prefill(tiny_model, tiny_model.new_cache(), torch.tensor([turn_of(20, 6)]), Compression("kvzip", 0.5))


def test_answers_follow_from_the_compressed_turn(tiny_model):
    """End to end: a compressed turn answers, and at r = 0 nothing is replayed or evicted."""
    turn = turn_of(20, 7)
    cache = tiny_model.new_cache()
    compressed = prefill(tiny_model, cache, torch.tensor([turn]), Compression("kvzip", 0.0))
    assert compressed.reports[0]["kept_mean"] == 20
    full = generate(tiny_model, cache, torch.tensor([[50, 51]]), 5, stop_ids=[])
    plain = tiny_model.new_cache()
    tiny_model(torch.tensor([turn]), plain)
    assert full == generate(tiny_model, plain, torch.tensor([[50, 51]]), 5, stop_ids=[])
