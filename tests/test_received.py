"""H2O's sums taken in the prefill's own attention pass (policies.attention_with_received, run by an Observer).

The reference is the explicit float64 causal attention matrix, one query head at a time:
received[kv, k] = sum over the query heads h reading KV head kv and over queries q of A_h[q, k].
"""
import math

import pytest
import torch
import torch.nn.functional as F

from policies import Compression, Context, attention_with_received, compress, h2o, observer_for
from reference import ref_h2o

L = 45


def ref_received(q, k, real=None):
    """(B, H_kv, T) float64: attention each key receives from the real queries, row by row."""
    B, H, T, D = q.shape
    kv_heads = k.shape[1]
    group = H // kv_heads
    out = torch.zeros(B, kv_heads, T, dtype=torch.float64)
    for b in range(B):
        n = T if real is None else int(real[b].sum())              # right padding: the first n are real
        for h in range(H):
            logits = q[b, h, :n].double() @ k[b, h // group, :n].double().T / math.sqrt(D)
            logits += torch.full((n, n), -math.inf, dtype=torch.float64).triu(1)
            out[b, h // group, :n] += logits.softmax(-1).sum(0)
    return out


def random_qkv(B, H, kv_heads, T, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, T, D, generator=gen) * 2 for n in (H, kv_heads, kv_heads))
    return q, k, v


@pytest.mark.parametrize("T", [1, 2, 7, 64, 65, 131])
@pytest.mark.parametrize("block", [None, 1, 5, 64])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (3, 1)])      # odd and even groups: halved matmuls or not
def test_output_and_received_equal_references(T, block, heads):
    H, kv_heads = heads
    q, k, v = random_qkv(2, H, kv_heads, T)
    y, received = attention_with_received(q, k, v, None, block=block)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != kv_heads)
    assert torch.allclose(y, expected, atol=1e-5, rtol=0)
    assert received.dtype == torch.float32 and received.shape == (2, kv_heads, T)
    assert torch.allclose(received.double(), ref_received(q, k), atol=1e-5, rtol=1e-6)


def test_padding_queries_send_no_attention_to_real_keys(tiny_model):
    """Right-padded rows through the cache's mask: each row's sums are those of the row alone."""
    lengths = [37, 20, 29]
    q, k, v = random_qkv(3, 6, 2, 37, seed=1)
    real = torch.arange(37)[None] < torch.tensor(lengths)[:, None]
    cache = tiny_model.new_cache(3)
    cache.begin(real)
    mask = cache.update(0, q, k, v)[2]                                   # (B, 1, T, T): the prefill's mask
    y, received = attention_with_received(q, k, v, mask, block=8)
    expected = ref_received(q, k, real)
    for row, n in enumerate(lengths):
        assert torch.allclose(received[row, :, :n].double(), expected[row, :, :n], atol=1e-5, rtol=1e-6)
        alone = F.scaled_dot_product_attention(q[row:row + 1, :, :n], k[row:row + 1, :, :n], v[row:row + 1, :, :n],
                                               is_causal=True, enable_gqa=True)
        assert torch.allclose(y[row:row + 1, :, :n], alone, atol=1e-5, rtol=0)


def recorded(model, tokens, received: bool, real=None):
    """The cache after a recorded prefill, its logits, and the Observer's record per layer (None without)."""
    cache = model.new_cache(tokens.shape[0])
    cache.record_queries()
    observer = observer_for([Compression("h2o" if received else "snapkv", 0.5)])
    logits = model(tokens, cache, real=real, attention=observer)
    cache.observed = None if observer is None else observer.records
    return cache, logits


def test_recording_received_leaves_the_prefill_unchanged(tiny_model):
    tokens = torch.randint(0, tiny_model.args.vocab_size, (1, L), generator=torch.Generator().manual_seed(5))
    plain, plain_logits = recorded(tiny_model, tokens, False)
    cache, logits = recorded(tiny_model, tokens, True)
    assert torch.allclose(logits, plain_logits, atol=1e-5, rtol=0)
    for layer in range(tiny_model.args.n_layers):
        assert torch.allclose(cache.keys[layer], plain.keys[layer], atol=1e-5, rtol=0)
        q, k = cache.queries[layer], cache.keys[layer][:, :, :L]
        assert torch.allclose(cache.observed[layer].double(), ref_received(q, k), atol=1e-5, rtol=1e-6)


def test_h2o_from_received_equals_full_matrix_reference(tiny_model):
    tokens = torch.randint(0, tiny_model.args.vocab_size, (1, L), generator=torch.Generator().manual_seed(5))
    cache, _ = recorded(tiny_model, tokens, True)
    for layer in range(tiny_model.args.n_layers):
        q, k = cache.queries[layer], cache.keys[layer][:, :, :L]
        observed = Context(layer, tiny_model.args.n_layers, observed=cache.observed[layer])
        scores = h2o(q, k, k, [(0, L)], observed)
        assert torch.allclose(scores.double(), ref_h2o(q, k, [(0, L)]), atol=1e-5, rtol=0)
        spans = [(0, 20), (20, L)]                                  # fair eviction: computed span by span
        fair = h2o(q, k, k, spans, observed)
        assert torch.allclose(fair.double(), ref_h2o(q, k, spans), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_compress_keeps_the_same_entries_with_received(tiny_model, ratio):
    tokens = torch.randint(0, tiny_model.args.vocab_size, (2, L), generator=torch.Generator().manual_seed(6))
    real = torch.arange(L)[None] < torch.tensor([[L], [31]])
    spec = Compression("h2o", ratio)
    assert spec.reads_observed()
    kept = []
    for received in (False, True):
        cache, _ = recorded(tiny_model, tokens, received, real=real)
        kept.append(compress(cache, spec, observed=cache.observed).kept)
    for a, b in zip(*kept):
        assert torch.equal(a, b)


def test_reads_observed_only_when_the_plain_h2o_scores_are_used():
    assert Compression("h2o", 0.5).reads_observed()
    assert Compression("h2o", 0.5, partitions=[(0, 5), (5, 9)], debias=0.5).reads_observed()
    assert not Compression("h2o", 0.5, partitions=[(0, 5), (5, 9)]).reads_observed()   # fair: span by span
    assert not Compression("h2o", 0.0).reads_observed()
    assert not Compression("snapkv", 0.5).reads_observed()


def test_received_needs_a_prefill_that_starts_the_cache(tiny_model):
    cache = tiny_model.new_cache()
    tiny_model(torch.tensor([[1, 2, 3]]), cache)
    observer = observer_for([Compression("h2o", 0.5)])
    with pytest.raises(RuntimeError, match="empty cache"):
        tiny_model(torch.tensor([[4, 5]]), cache, attention=observer)


def test_bfloat16_prefill_records_float32_sums(tmp_path):
    from conftest import write_tiny_checkpoint
    from model import load_model
    folder = write_tiny_checkpoint(tmp_path / "m")
    model = load_model(folder, dtype="bfloat16")
    tokens = torch.randint(0, model.args.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    cache, logits = recorded(model, tokens, True)
    _, plain_logits = recorded(model, tokens, False)
    assert logits.dtype == plain_logits.dtype and (logits - plain_logits).abs().max() < 0.1
    for layer in range(model.args.n_layers):
        q, k = cache.queries[layer], cache.keys[layer][:, :, :30]
        assert cache.observed[layer].dtype == torch.float32
        assert torch.allclose(cache.observed[layer].double(), ref_received(q, k), atol=1e-5, rtol=1e-5)  # errors <= 1.3e-6
