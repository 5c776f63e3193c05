"""Slow, obviously-correct references that several test files share, and a way to run the fast path
on given tensors.

The references materialise the full causal attention matrix in float64 with explicit loops over
heads. `kept_masks` runs policies.compress on a cache that holds exactly the queries, keys and
values given, so a test can compare the fast selection with a reference computed from the same
tensors.
"""
import math

import torch
import torch.nn.functional as F

from model import apply_rope
from policies import Replay

from cache import KVCache
from policies import compress


# a replay for tests on the tiny random models (vocabulary 96): a 3-token header, then prompts of made-up ids
REPLAY = Replay(start=3, prompt=[11, 12, 13, 14], later_prompt=[21, 22, 23], suffix=[31, 32])


def kept_masks(spec, layers, inv_freq=None, observed=None, system_len=None):
    """The fast path's kept masks, (H_kv, n) per layer, for one row's (q, k, v) of every layer
    (q (1, H, n, D), k and v (1, H_kv, n, D)); `observed` as an Observer records it (H2O's sums)."""
    _, kv_heads, n, dim = layers[0][1].shape
    cache = KVCache(len(layers), 1, kv_heads, dim, capacity=n, dtype=layers[0][1].dtype, inv_freq=inv_freq)
    cache.record_queries()
    cache.begin(torch.ones(1, n, dtype=torch.bool))
    for index, (q, k, v) in enumerate(layers):
        cache.update(index, q, k, v)
    return [mask[0] for mask in compress(cache, spec, system_len=system_len, observed=observed).kept]


def ref_quotas(lengths: list[int], total: int) -> list[int]:
    """The paper's fair budgets, in integers: of two spans the earlier keeps floor(total len / L) and the later
    the rest; with more spans, each keeps the floor of its cumulative share minus what the earlier ones took."""
    L, quotas, taken, seen = sum(lengths), [], 0, 0
    for length in lengths:
        seen += length
        quotas.append(total * seen // L - taken)
        taken += quotas[-1]
    return quotas


def ref_attention(q, k):
    """A[h, i, j]: float64 causal softmax, query head h reading KV head h // group."""
    H, kv_heads, n, D = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    A = torch.zeros(H, n, n, dtype=torch.float64)
    for h in range(H):
        logits = q[0, h].double() @ k[0, h // (H // kv_heads)].double().T / math.sqrt(D)
        for i in range(n):
            logits[i, i + 1:] = -math.inf
        A[h] = logits.softmax(-1)
    return A


def ref_gqa_mean(per_head, kv_heads):
    H = per_head.shape[0]
    g = H // kv_heads
    return torch.stack([per_head[j * g:(j + 1) * g].mean(0) for j in range(kv_heads)])


def ref_h2o(q, k, spans):
    A = ref_attention(q, k)
    scores = torch.zeros(A.shape[0], k.shape[2], dtype=torch.float64)
    for s, e in spans:
        for j in range(s, e):
            scores[:, j] = A[:, j:e, j].sum(1) / (e - j)  # only queries of j's own span, i >= j
    return ref_gqa_mean(scores, k.shape[1])


def ref_avg_pool(x, kernel):
    n, half = len(x), kernel // 2
    return torch.tensor([sum(x[t] for t in range(j - half, j + half + 1) if 0 <= t < n) / kernel for j in range(n)])


def ref_snapkv(q, k, spans, window=16, kernel=5):
    A = ref_attention(q, k)
    H = A.shape[0]
    scores = torch.zeros(H, k.shape[2], dtype=torch.float64)
    protected = []
    for j, (s, e) in enumerate(spans):
        w = window // len(spans) + (1 if j < window % len(spans) else 0)
        w = min(w, e - s - 1)
        for h in range(H):
            observed = A[h, e - w:e, s:e - w].mean(0)
            scores[h, s:e - w] = ref_avg_pool(observed, kernel)
        protected += list(range(e - w, e))
    scores = ref_gqa_mean(scores, k.shape[1])
    scores[:, protected] = math.inf
    return scores


def rms(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def forward64(model, tokens, seen_until=None):
    """Float64 forward of the whole sequence; seen_until[layer][h][k] = the last position whose query sees key k
    (None: every key at or before the query).

    Returns the last position's logits, and per layer the queries (H, n, D), keys and values (H_kv, n, D), and
    the attention's input (n, dim).
    """
    a = model.args
    n = len(tokens)
    positions = torch.arange(n)
    freqs = positions[:, None].double() * model.inv_freq.double()
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    x = model.embed_tokens.weight.double()[torch.tensor(tokens)]                 # (n, dim)
    group = a.n_heads // a.n_kv_heads
    per_layer = []
    for i, block in enumerate(model.layers):
        att = block.self_attn
        h = rms(x, block.input_layernorm.weight.double(), a.norm_eps)
        attention_input = h
        q = (h @ att.q_proj.weight.double().T).view(n, a.n_heads, a.head_dim).transpose(0, 1)
        k = (h @ att.k_proj.weight.double().T).view(n, a.n_kv_heads, a.head_dim).transpose(0, 1)
        v = (h @ att.v_proj.weight.double().T).view(n, a.n_kv_heads, a.head_dim).transpose(0, 1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        outputs = []
        for head in range(a.n_heads):
            kv = head // group
            visible = positions[None, :] <= positions[:, None]
            if seen_until is not None:
                visible &= positions[:, None] <= seen_until[i][kv][None, :n]
            logits = (q[head] @ k[kv].T / math.sqrt(a.head_dim)).masked_fill(~visible, -math.inf)
            outputs.append(logits.softmax(-1) @ v[kv])
        y = torch.stack(outputs, 1).reshape(n, -1)
        x = x + y @ att.o_proj.weight.double().T
        h = rms(x, block.post_attention_layernorm.weight.double(), a.norm_eps)
        mlp = block.mlp
        x = x + (F.silu(h @ mlp.gate_proj.weight.double().T) * (h @ mlp.up_proj.weight.double().T)) @ mlp.down_proj.weight.double().T
        per_layer.append((q, k, v, attention_input))
    logits = rms(x[-1], model.norm.weight.double(), a.norm_eps) @ model.lm_head.weight.double().T
    return logits, per_layer


# ----------------------------------------------------------------------------- allocations, by sorting lists

def ref_shared_counts(scores, safe, total):
    """Per-head counts when heads share `total` entries (scores: a list per head, of what it holds; heads may
    hold different numbers): each head's best `safe` first, then the best over all heads, by score; equal
    entries in (head, index) order."""
    entries = []
    for h, head in enumerate(scores):
        best = set(sorted(range(len(head)), key=lambda j: -head[j])[:safe])
        entries += [(j in best, head[j], h) for j in range(len(head))]
    chosen = sorted(entries, key=lambda e: (e[0], e[1]), reverse=True)[:total]   # a stable sort: ties keep order
    return [sum(1 for e in chosen if e[2] == h) for h in range(len(scores))]


def ref_adakv_counts(scores, n_kept, alpha=0.2):
    """Per-head counts: each head's best max(1, int(n_kept alpha)) first, then the best H * n_kept over all heads."""
    return ref_shared_counts(scores, max(1, int(n_kept * alpha)), len(scores) * n_kept)


def ref_global_counts(scores, budget, n_sink=4):
    """KVzip's shared budget at a decode cut (scores[layer][head]: a list of what that head holds): of the N
    entries of every layer and head, int(N budget / width) stay, width the most any head holds; each head
    keeps its n_sink best first, then the best over all (layer, head). Returns counts per layer, per head."""
    heads = [head for layer in scores for head in layer]
    total, width = sum(len(head) for head in heads), max(len(head) for head in heads)
    flat = ref_shared_counts(heads, n_sink, int(total * budget / width))
    per_layer, start = [], 0
    for layer in scores:
        per_layer.append(flat[start:start + len(layer)])
        start += len(layer)
    return per_layer


def ref_pyramid_budget(L, budget, layer, n_layers, window=16, beta=20):
    """kvpress 0.5.5 PyramidKVPress.get_layer_budget, line by line, for a mean `budget` (L (1 - r) at the prefill)."""
    max_capacity_prompt = window + budget
    min_num = (max_capacity_prompt - window) / beta
    max_num = (max_capacity_prompt - window) * 2 - min_num
    if max_num >= L - window:
        max_num = L - window
        min_num = (max_capacity_prompt - window) * 2 - max_num
    if not (L >= max_num >= min_num >= window):
        return max(1, round(budget))
    steps = (max_num - min_num) / (n_layers - 1) if n_layers > 1 else 0.0
    return round(max_num - layer * steps)
