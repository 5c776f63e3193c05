"""cache.py: decoding after compression, reuse of a compressed system turn, batching.

The reference for decoding after eviction is a naive float64 forward pass written here
with explicit loops: queries after the system turn may not see the evicted (layer, KV
head, position) entries, and every token sits at its original position.
"""
import math

import pytest
import torch

from cache import HEADROOM
from model import generate
from policies import ALLOCATIONS, POLICIES, Compression, compress, prefill
from reference import REPLAY

L, USER = 40, 7
PAIRS = [(p, a) for p in POLICIES for a in ALLOCATIONS]


def naive_logits(model, tokens, system_len, kept):
    """Float64 forward of `tokens` (T,) where position t >= system_len cannot see evicted entries."""
    a = model.args
    T, group = len(tokens), a.n_heads // a.n_kv_heads
    W = lambda lin: lin.weight.double()
    B = lambda lin, n: lin.bias.double() if lin.bias is not None else torch.zeros(n, dtype=torch.float64)
    def rms(x, norm):
        return norm.weight.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + a.norm_eps)
    def rope(x):                                                          # (T, heads, D)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * model.inv_freq.double()[None]
        cos, sin = torch.cat([angle.cos()] * 2, -1)[:, None], torch.cat([angle.sin()] * 2, -1)[:, None]
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin
    x = model.embed_tokens.weight.double()[tokens]
    for i, layer in enumerate(model.layers):
        att, h = layer.self_attn, rms(x, layer.input_layernorm)
        q = rope((h @ W(att.q_proj).T + B(att.q_proj, a.n_heads * a.head_dim)).view(T, a.n_heads, a.head_dim))
        k = rope((h @ W(att.k_proj).T + B(att.k_proj, a.n_kv_heads * a.head_dim)).view(T, a.n_kv_heads, a.head_dim))
        v = (h @ W(att.v_proj).T + B(att.v_proj, a.n_kv_heads * a.head_dim)).view(T, a.n_kv_heads, a.head_dim)
        out = torch.zeros(T, a.n_heads, a.head_dim, dtype=torch.float64)
        for head in range(a.n_heads):
            kv = head // group
            for t in range(T):
                visible = [s for s in range(t + 1) if t < system_len or s >= system_len or kept[i][kv, s]]
                w = torch.softmax(torch.stack([q[t, head] @ k[s, kv] for s in visible]) / math.sqrt(a.head_dim), 0)
                out[t, head] = sum(wi * v[s, kv] for wi, s in zip(w, visible))
        x = x + out.reshape(T, -1) @ W(att.o_proj).T
        mlp, h = layer.mlp, rms(x, layer.post_attention_layernorm)
        x = x + (torch.nn.functional.silu(h @ W(mlp.gate_proj).T) * (h @ W(mlp.up_proj).T)) @ W(mlp.down_proj).T
    return rms(x, model.norm) @ model.lm_head.weight.double().T


def tokens_for(model, seed=7):
    return torch.randint(0, model.args.vocab_size, (1, L + USER), generator=torch.Generator().manual_seed(seed))


def compressed(model, system, spec, real=None):
    """A cache holding the compressed system turn; what compression did rides along as .reports, .kept, .keep_rate."""
    cache = model.new_cache(system.shape[0])
    result = prefill(model, cache, system, spec, real=real, replay=REPLAY)
    cache.reports, cache.kept, cache.keep_rate = result.reports, result.kept, result.keep_rate
    return cache


@pytest.mark.parametrize("policy,allocation", PAIRS)
def test_decoding_after_compression_matches_naive_reference(tiny_model, policy, allocation):
    """The user turn as one chunk, then one token: both against the reference hiding evicted (layer, head) entries."""
    tokens = tokens_for(tiny_model)
    cache = compressed(tiny_model, tokens[:, :L], Compression(policy, 0.5, allocation=allocation))
    ours = tiny_model(tokens[:, L:-1], cache, all_logits=True)[0]
    ours = torch.cat([ours, tiny_model(tokens[:, -1:], cache, all_logits=True)[0]])
    kept = [k[0] for k in cache.kept]
    reference = naive_logits(tiny_model, tokens[0], L, kept)[L:]
    assert (ours.double() - reference).abs().max() < 1e-4
    assert int(cache.next_position[0]) == int(cache.next_rotary[0]) == L + USER


def test_adakv_leaves_heads_ragged_and_the_reference_notices(tiny_model):
    """Not vacuous: AdaKV's heads keep different counts, and ignoring that (every head attends to
    every slot up to the layer's longest head) would fail the reference."""
    tokens = tokens_for(tiny_model)
    cache = compressed(tiny_model, tokens[:, :L], Compression("snapkv", 0.5, allocation="adakv"))
    counts = [k[0].sum(-1) for k in cache.kept]
    assert any(len(set(c.tolist())) > 1 for c in counts)
    for valid, n in zip(cache.valid, cache.lengths):
        valid[:, :, :n] = True                                              # simulate a mask shared by all heads
    wrong = tiny_model(tokens[:, L:], cache, all_logits=True)[0]
    reference = naive_logits(tiny_model, tokens[0], L, [k[0] for k in cache.kept])[L:]
    assert (wrong.double() - reference).abs().max() > 1e-3


@pytest.mark.parametrize("policy,allocation", PAIRS)
def test_buffers_are_sized_by_each_layers_largest_head(tiny_model, policy, allocation):
    tokens = tokens_for(tiny_model)
    cache = compressed(tiny_model, tokens[:, :L], Compression(policy, 0.6, allocation=allocation))
    largest = [int(k[0].sum(-1).max()) for k in cache.kept]
    a = tiny_model.args
    entry_bytes = 2 * a.n_kv_heads * a.head_dim * 4
    assert cache.lengths == largest
    assert [k.shape[2] for k in cache.keys] == [n + HEADROOM for n in largest]      # not L, not the max over layers
    assert cache.nbytes() == sum(n + HEADROOM for n in largest) * entry_bytes
    assert cache.reports[0]["kv_bytes"] == sum(largest) * entry_bytes
    generate(tiny_model, cache, tokens[:, L:], 20, stop_ids=[])
    assert [k.shape[2] for k in cache.keys] == [n + HEADROOM for n in largest]      # the answer fits the headroom


def test_positions_do_not_restart_at_the_compressed_length(tiny_model):
    """A cache that re-numbered positions from n_kept would fail the naive reference."""
    tokens = tokens_for(tiny_model)
    cache = compressed(tiny_model, tokens[:, :L], Compression("streaming_llm", 0.5))
    cache.next_rotary[:] = cache.lengths[0]                              # simulate the bug
    wrong = tiny_model(tokens[:, L:], cache, all_logits=True)[0]
    reference = naive_logits(tiny_model, tokens[0], L, [k[0] for k in cache.kept])[L:]
    assert (wrong.double() - reference).abs().max() > 1e-3


@pytest.mark.parametrize("spec", [Compression("full", 0.7), Compression("tova", 0.0), Compression("h2o", 0.0)])
def test_no_eviction_gives_identical_logits_and_answers(tiny_model, spec):
    tokens = tokens_for(tiny_model)
    plain = tiny_model.new_cache()
    tiny_model(tokens[:, :L], plain)
    cache = compressed(tiny_model, tokens[:, :L], spec)
    assert torch.equal(tiny_model(tokens[:, L:], cache, all_logits=True),
                       tiny_model(tokens[:, L:], plain, all_logits=True))
    a, b = compressed(tiny_model, tokens[:, :L], spec), tiny_model.new_cache()
    tiny_model(tokens[:, :L], b)
    assert generate(tiny_model, a, tokens[:, L:], 12, stop_ids=[]) == generate(tiny_model, b, tokens[:, L:], 12, stop_ids=[])


@pytest.mark.parametrize("allocation", list(ALLOCATIONS))
def test_restore_returns_to_the_compressed_state_bit_identically(tiny_model, allocation):
    tokens = tokens_for(tiny_model)
    cache = compressed(tiny_model, tokens[:, :L], Compression("snapkv", 0.6, allocation=allocation))
    saved = cache.checkpoint()
    n = list(cache.lengths)
    before = [(k[:, :, :m].clone(), v[:, :, :m].clone()) for k, v, m in zip(cache.keys, cache.values, n)]
    first = generate(tiny_model, cache, tokens[:, L:], 80, stop_ids=[])            # grows the buffers too
    cache.restore(saved)
    assert cache.lengths == n == saved["lengths"] and torch.equal(cache.next_rotary, saved["next_rotary"])
    for (k0, v0), k, v, valid, m, valid0 in zip(before, cache.keys, cache.values, cache.valid, n, saved["valid"]):
        assert torch.equal(valid[:, :, :m], valid0) and not valid[:, :, m:].any()
        assert torch.equal(k0, k[:, :, :m]) and torch.equal(v0, v[:, :, :m])
    assert generate(tiny_model, cache, tokens[:, L:], 80, stop_ids=[]) == first


def test_compress_needs_a_recorded_prefill(tiny_model):
    cache = tiny_model.new_cache()
    tiny_model(tokens_for(tiny_model)[:, :L], cache)
    with pytest.raises(RuntimeError, match="record"):
        compress(cache, Compression("tova", 0.5))


def test_keep_rate_is_the_mean_over_heads_and_layers(tiny_model):
    cache = compressed(tiny_model, tokens_for(tiny_model)[:, :L], Compression("knorm", 0.5))
    rate = cache.keep_rate()
    manual = torch.stack([k[0].float().mean(0) for k in cache.kept]).mean(0)
    assert rate.shape == (L,) and torch.equal(rate, manual)
    assert rate.mean() == pytest.approx(int(L * 0.5) / L)


@pytest.mark.parametrize("policy,allocation", PAIRS)
def test_batched_rows_compress_like_rows_alone(tiny_model, policy, allocation):
    """Rows of different lengths, right-padded: same kept positions and same answers as batch 1."""
    gen = torch.Generator().manual_seed(11)
    lengths, user_lengths = [L, 29, 36], [USER, 4, 6]
    systems = torch.randint(0, tiny_model.args.vocab_size, (3, L), generator=gen)
    users = torch.randint(0, tiny_model.args.vocab_size, (3, USER), generator=gen)
    real = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    user_real = torch.arange(USER)[None] < torch.tensor(user_lengths)[:, None]
    specs = [Compression(policy, r, whitelist=[5], allocation=allocation) for r in (0.5, 0.3, 0.7)]
    batch = compressed(tiny_model, systems, specs, real=real)   # H2O: the padded prefill's sums
    answers = generate(tiny_model, batch, users, 10, real=user_real, stop_ids=[])
    for row in range(3):
        alone = compressed(tiny_model, systems[row:row + 1, :lengths[row]], specs[row])
        assert batch.reports[row] == alone.reports[0]
        for a, b in zip(batch.kept, alone.kept):
            assert torch.equal(a[row, :, :lengths[row]], b[0])
        assert answers[row] == generate(tiny_model, alone, users[row:row + 1, :user_lengths[row]], 10, stop_ids=[])[0]


@pytest.mark.parametrize("spec", [Compression("tova", 0.5), Compression("knorm", 0.5, allocation="adakv")])
def test_rows_that_finish_leave_the_batch_and_restore_brings_them_back(tiny_model, spec):
    gen = torch.Generator().manual_seed(12)
    systems = torch.randint(0, tiny_model.args.vocab_size, (3, L), generator=gen)
    users = torch.randint(0, tiny_model.args.vocab_size, (3, USER), generator=gen)
    free = []
    for row in range(3):
        alone = compressed(tiny_model, systems[row:row + 1], spec)
        free.append(generate(tiny_model, alone, users[row:row + 1], 12, stop_ids=[])[0])
    stop = [free[1][3]]                                                   # row 1 finishes early, others maybe
    expected = [answer[:answer.index(stop[0])] if stop[0] in answer else answer for answer in free]
    batch = compressed(tiny_model, systems, spec)
    saved = batch.checkpoint()
    assert generate(tiny_model, batch, users, 12, stop_ids=stop) == expected
    assert batch.batch_size < 3                                           # the finished row left the batch
    batch.restore(saved)
    assert batch.batch_size == 3 and generate(tiny_model, batch, users, 12, stop_ids=[]) == free
