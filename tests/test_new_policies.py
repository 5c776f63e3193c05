"""Expected Attention and KeyDiff (policies.expected_attention, policies.keydiff) against slow,
obviously-correct float64 references on tiny random models.

The Expected Attention reference builds every RoPE rotation as an explicit D x D matrix from
cos and sin, position by position: it undoes each query's rotation with the transpose of its
matrix, materialises the mean and covariance with sums of outer products, averages the 512
future matrices one by one, and writes softmax, GQA mean and value norm as loops over heads.
Nothing is shared with the fast code but the model's RoPE frequencies.
"""
import math

import pytest
import torch

from conftest import write_tiny_checkpoint
from model import load_model
from model import apply_rope, rope_cos_sin
from policies import Compression, Context, covering_spans, expected_attention, keydiff, prefill as compress_prefill

L = 45


def record(model, tokens):
    """Post-RoPE queries, keys and values of every layer after a system prefill of `tokens` (1, L)."""
    cache = model.new_cache()
    cache.record_queries()
    model(tokens, cache)
    n = tokens.shape[1]
    return [(q.clone(), cache.keys[i][:, :, :n].clone(), cache.values[i][:, :, :n].clone())
            for i, q in enumerate(cache.queries)]


@pytest.fixture(scope="module")
def prefill(tiny_model):
    tokens = torch.randint(0, tiny_model.args.vocab_size, (1, L), generator=torch.Generator().manual_seed(5))
    return tokens, record(tiny_model, tokens)


# ----------------------------------------------------------------------------- references

def rotation(position, inv_freq):
    """RoPE at `position` as a D x D float64 matrix: coordinate j pairs with j + D/2 (rotate-half layout)."""
    half = len(inv_freq)
    R = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    for j in range(half):
        angle = position * float(inv_freq[j])
        R[j, j], R[j, j + half] = math.cos(angle), -math.sin(angle)
        R[j + half, j], R[j + half, j + half] = math.sin(angle), math.cos(angle)
    return R


def ref_expected_attention(q, k, v, inv_freq, n_future=512, n_sink=4, covariance=True, value_norm=True,
                           epsilon=0.0):
    H, n, D = q.shape[1], q.shape[2], q.shape[3]
    kv_heads = k.shape[1]
    group = H // kv_heads
    average = sum(rotation(p, inv_freq) for p in range(n, n + n_future)) / n_future          # (D, D)
    scores = torch.full((kv_heads, n), math.inf, dtype=torch.float64)
    per_head = torch.zeros(H, n - n_sink, dtype=torch.float64)
    for h in range(H):
        pre_rope = [rotation(i, inv_freq).T @ q[0, h, i].double() for i in range(n_sink, n)]   # R_i^-1 = R_i^T
        mean = sum(pre_rope) / len(pre_rope)
        cov = sum(torch.outer(x - mean, x - mean) for x in pre_rope) / len(pre_rope)
        mean, cov = average @ mean, average @ cov @ average.T
        logits = []
        for j in range(n_sink, n):
            key = k[0, h // group, j].double()
            logit = float(key @ mean) / math.sqrt(D)
            if covariance:
                logit += float(key @ cov @ key) / (2 * D)
            logits.append(logit)
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        per_head[h] = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    for kv in range(kv_heads):
        mean_over_group = per_head[kv * group:(kv + 1) * group].mean(0)
        if value_norm:
            norms = torch.tensor([math.sqrt(sum(float(x) ** 2 for x in v[0, kv, j])) for j in range(n_sink, n)],
                                 dtype=torch.float64)
            mean_over_group = (mean_over_group + epsilon) * norms
        scores[kv, n_sink:] = mean_over_group
    return scores


def ref_keydiff(k, spans):
    kv_heads, n = k.shape[1], k.shape[2]
    scores = torch.zeros(kv_heads, n, dtype=torch.float64)
    for h in range(kv_heads):
        for s, e in spans:
            keys = [k[0, h, j].double() for j in range(s, e)]
            anchor = sum(x / x.norm() for x in keys) / len(keys)
            for j, x in zip(range(s, e), keys):
                scores[h, j] = -float(x @ anchor) / (float(x.norm()) * float(anchor.norm()))
    return scores


def close(fast, reference, rtol=1e-4):
    fast, reference = fast.double().reshape(reference.shape), reference.double()
    if not torch.equal(fast.isinf(), reference.isinf()):
        return False
    finite = reference.isfinite()
    return torch.allclose(fast[finite], reference[finite], rtol=rtol, atol=1e-7 * float(reference[finite].abs().max()))


# ----------------------------------------------------------------------------- Expected Attention

@pytest.mark.parametrize("options", [{}, {"covariance": False}, {"value_norm": False}, {"epsilon": 0.01},
                                     {"n_future": 7, "n_sink": 2}])
def test_expected_attention_equals_the_explicit_rotation_reference(tiny_model, prefill, options):
    for index, (q, k, v) in enumerate(prefill[1]):
        fast = expected_attention(q, k, v, [(0, L)], Context(index, 2, inv_freq=tiny_model.inv_freq), **options)
        assert fast.shape == (1, k.shape[1], L)
        assert close(fast, ref_expected_attention(q, k, v, tiny_model.inv_freq, **options)), (index, options)


@pytest.mark.parametrize("overrides", [
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}),
    dict(model_type="qwen2", num_attention_heads=8, num_key_value_heads=2),        # q bias, GQA group of 4
])
def test_expected_attention_on_other_models(tmp_path, overrides):
    """Llama-3.1's scaled frequencies (undone and predicted with the same scaling), Qwen2's q bias, larger groups."""
    model = load_model(write_tiny_checkpoint(tmp_path / "m", seed=3, **overrides))
    tokens = torch.randint(0, model.args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    for index, (q, k, v) in enumerate(record(model, tokens)):
        fast = expected_attention(q, k, v, [(0, 40)], Context(index, 2, inv_freq=model.inv_freq))
        assert close(fast, ref_expected_attention(q, k, v, model.inv_freq)), (overrides, index)


@pytest.mark.parametrize("overrides", [{}, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 16}),
                                       dict(model_type="qwen2")])
def test_undoing_rope_gives_the_queries_before_rope(tmp_path, overrides):
    """Layer 0's pre-RoPE queries are q_proj(input_layernorm(embedding)): what RoPE at -positions must return."""
    model = load_model(write_tiny_checkpoint(tmp_path / "m", seed=4, **overrides))
    tokens = torch.randint(0, model.args.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    q_post = record(model, tokens)[0][0]                                          # (1, H, T, D)
    attention = model.layers[0].self_attn
    with torch.no_grad():
        x = model.layers[0].input_layernorm(model.embed_tokens(tokens))
        q_pre = attention.q_proj(x).view(1, 30, attention.n_heads, attention.head_dim).transpose(1, 2)
    undone = apply_rope(q_post.float(), *rope_cos_sin(model.inv_freq, -torch.arange(30)[None], torch.float32))
    assert torch.allclose(undone, q_pre, atol=1e-5 * float(q_pre.abs().max()))
    assert not torch.allclose(q_post, q_pre, atol=1e-2 * float(q_pre.abs().max()))      # RoPE did rotate them


def test_expected_attention_keeps_the_sinks_and_ignores_spans(tiny_model, prefill):
    where = Context(0, 2, inv_freq=tiny_model.inv_freq)
    q, k, v = prefill[1][0]
    plain = expected_attention(q, k, v, [(0, L)], where)
    assert plain[..., :4].isinf().all() and plain[..., 4:].isfinite().all()
    for spans in ([(0, 20), (20, L)], covering_spans([(2, 15), (15, 33), (33, 43)], L)):
        assert torch.equal(expected_attention(q, k, v, spans, where), plain)   # future queries belong to no span
    short = expected_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], [(0, 4)], where)
    assert short.isinf().all()                                                   # every token a sink


def test_expected_attention_without_rope_frequencies_is_a_clear_error(prefill):
    q, k, v = prefill[1][0]
    with pytest.raises(ValueError, match="RoPE frequencies"):
        expected_attention(q, k, v, [(0, L)], Context(0, 1))


def test_compress_gives_expected_attention_the_models_frequencies(tiny_model, prefill):
    """End to end through policies.prefill: the kept sets are the reference's top n_kept (sinks first)."""
    tokens, layers = prefill
    spec = Compression("expected_attention", 0.6)
    compressed = compress_prefill(tiny_model, tiny_model.new_cache(), tokens, spec)
    n_kept = spec.n_kept(L)
    for index, (q, k, v) in enumerate(layers):
        reference = ref_expected_attention(q, k, v, tiny_model.inv_freq)
        for h in range(k.shape[1]):
            expected = set(reference[h].topk(n_kept).indices.tolist())
            assert set(compressed.kept[index][0, h].nonzero()[:, 0].tolist()) == expected, (index, h)


# ----------------------------------------------------------------------------- KeyDiff

@pytest.mark.parametrize("spans", [[(0, L)], [(0, 20), (20, L)], [(0, 9), (9, 30), (30, L)]])
def test_keydiff_equals_the_reference(prefill, spans):
    for index, (q, k, v) in enumerate(prefill[1]):
        assert close(keydiff(q, k, v, spans, Context(index, 2)), ref_keydiff(k, spans), rtol=1e-5), (index, spans)


def test_keydiff_anchors_are_per_span(prefill):
    q, k, v = prefill[1][1]
    whole = keydiff(q, k, v, [(0, L)], Context(1, 2))
    split = keydiff(q, k, v, [(0, 20), (20, L)], Context(1, 2))
    assert not torch.allclose(whole, split)
    assert torch.allclose(split[..., 20:], keydiff(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], [(0, L - 20)],
                                                   Context(1, 2)))
