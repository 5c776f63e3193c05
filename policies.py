"""Eviction policies and budget allocations. A policy is a score function, higher = keep; an
allocation turns a layer's scores into how many entries each KV head keeps. Then the code that
turns scores into kept positions, written once for all of them: budgets, protected tokens,
whitelists, and fair eviction over partitions (docs/method.md).

A policy is called on one row of the system turn's prefill, one layer at a time:

    scores = policy(queries, keys, values, spans, layer, **options)   # -> (1, H_kv, L)

    queries (1, H, L, D)     post-RoPE, as the attention layer computed them
    keys    (1, H_kv, L, D)  post-RoPE, as cached
    values  (1, H_kv, L, D)
    spans   [(start, end), ...] contiguous token spans covering [0, L): one span for the
            plain policy, one per partition for fair eviction. A policy scores every span
            on its own terms (its own window, its own anchor, its own recency), and the
            selection gives each span its share of the budget.
    layer   Layer: which layer (index, count), a dict the policy may keep across the layers
            of one row, and what the prefill observed for it (H2O's attention sums).

An allocation is called once per layer and row with the budget n_kept = max(1, int(L (1 - r))):

    counts = allocation(plain, L, n_kept, layer, ratio, **options)   # -> int, or (H_kv,) per KV head

    plain() returns the policy's whole-turn scores (H_kv, L) and their tiers (see `tiers`),
    computed on first use; only allocations that rank scores call it.

How the remedies combine with an allocation: the allocation decides HOW MANY entries each
(layer, KV head) keeps; the whitelist and fair eviction decide WHICH. A whitelist ranks its
tokens above every unprotected token, in the allocation (AdaKV's ranking across heads) and in
each head's selection; a head's count smaller than the whitelist keeps its best-scored
whitelisted tokens. Fair eviction splits each head's count over the partitions in proportion
to their lengths (largest remainder), so every partition keeps the same fraction of every
layer; debias blends that split with where the plain policy put the head's count.

H2O's scores are the attention each key receives in the prefill. A policy may name an
*observer* (OBSERVERS): an attention function that the cache runs in the system prefill
instead of flash attention, which returns the output and what the policy reads. H2O's is
`attention_with_received`, far cheaper than a second pass over every q . k.

Tokens a policy must never drop (sinks, SnapKV's window, TOVA's anchor) get +inf.
Attention probabilities are computed in float32. Adding a policy = one function and one
line in POLICIES; adding an allocation = one function and one line in ALLOCATIONS.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

INF = float("inf")


# ----------------------------------------------------------------------------- helpers

def attention_probs(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention (float32) of some queries over all keys.

    queries (H, n, D) sitting at `query_positions` (n,); keys (1, H_kv, S, D). Returns (H, n, S).
    Under GQA, query head h reads KV head h // (H / H_kv), as in Hugging Face's repeat_kv: the
    queries of the heads that share a KV head are stacked, so one matmul per KV head serves
    them all and the keys are never copied.
    """
    H, n, D = queries.shape
    kv_heads, S = keys.shape[1], keys.shape[2]
    scaled = queries.float() / math.sqrt(D)                 # scale the few queries, not the many logits
    grouped = scaled.reshape(kv_heads, H // kv_heads * n, D)                       # (H_kv, group * n, D)
    logits = (grouped @ keys[0].float().transpose(1, 2)).view(H, n, S)             # (H, n, S)
    first = int(query_positions.min()) + 1                  # keys before it are visible to every query
    future = torch.arange(first, S, device=keys.device)[None, :] > query_positions[:, None]  # (n, S - first)
    logits[..., first:].masked_fill_(future, -INF)
    return logits.softmax(-1)


def gqa_mean(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Average per-query-head scores (H, L) over the heads sharing a KV head -> (1, H_kv, L)."""
    H, L = scores.shape
    return scores.view(kv_heads, H // kv_heads, L).mean(1)[None]


@dataclass
class Layer:
    """Which layer a policy scores: a policy may depend on depth, or keep state across layers."""
    index: int                              # 0 .. count - 1
    count: int                              # layers in the model
    state: dict = field(default_factory=dict)    # one dict per row, shared by the layers of one compress()
    observed: torch.Tensor | None = None    # what the prefill's observer recorded, e.g. H2O's sums (1, H_kv, L)


# ----------------------------------------------------------------------------- policies

def streaming_llm(queries, keys, values, spans, layer, n_sink: int = 4):
    """StreamingLLM: keep the first `n_sink` tokens and the most recent ones.

    Recency is the position itself, so within each span the latest tokens win: with
    partitions this is the paper's per-span recency ramp.
    """
    L = keys.shape[2]
    scores = torch.arange(L, dtype=torch.float32, device=keys.device)
    scores[:n_sink] = INF
    return scores.expand(1, keys.shape[1], L)


def h2o(queries, keys, values, spans, layer, block: int = 32):
    """H2O as kvpress's ObservedAttention: mean attention a key receives from the queries that see it.

    score[k] = sum_q A[q, k] / (number of queries that see k), GQA mean. The plain policy takes
    the sums from the prefill when its observer recorded them (`layer.observed`, from
    attention_with_received). With partitions, the attention that a later span's queries pay
    to an earlier span's keys is removed, so a key counts only its own span's queries
    (softmax rows are not renormalised); without the prefill's sums, they are
    accumulated over blocks of `block` queries, each reading only the keys it can see: memory
    O(block * L) per head, never L x L. A block never straddles two spans, so the keys of the
    block's own span are one slice.
    """
    H, L = queries.shape[1], keys.shape[2]
    if layer.observed is not None and len(spans) == 1:
        seen_by = torch.arange(L, 0, -1, device=keys.device)                      # L - k queries see key k
        return layer.observed / (H // keys.shape[1]) / seen_by
    queries, keys = queries.float(), keys.float()                                 # convert once, not per block
    totals = torch.zeros(H, L, device=keys.device)                                # (H, L)
    n_queries = torch.zeros(L, device=keys.device)                                # (L,) queries that see k
    for span_start, span_end in spans:
        for start in range(span_start, span_end, block):
            end = min(start + block, span_end)
            rows = torch.arange(start, end, device=keys.device)
            attn = attention_probs(queries[0, :, start:end], keys[:, :, :end], rows)  # (H, n, end)
            totals[:, span_start:end] += attn[..., span_start:].sum(1)
        n_queries[span_start:span_end] = torch.arange(span_end - span_start, 0, -1)
    return gqa_mean(totals / n_queries, keys.shape[1])


def attention_with_received(q, k, v, mask, block: int | None = None, scratch: dict | None = None):
    """Attention over a chunk that starts the cache, which also sums what each key receives.

    q (B, H, T, D); k, v (B, H_kv, T, D); mask None (causal) or (B, 1, T, T) as cache.update
    makes it. Returns the output (B, H, T, D) in q's dtype and received (B, H_kv, T), float32:
    sum over query heads sharing the KV head and over queries q of softmax(q . k) -- exactly
    what H2O ranks keys by (h2o). Summing it here costs a fraction of a second
    attention pass, which would recompute every q . k (kvpress reads the same sums from eager
    attention weights).

    Blocks of `block` queries see only the keys up to their last one, so memory is
    O(block * T) per head, never T x T. The query heads sharing a KV head are stacked into
    one matmul per block, cut in two halves so that the batch of matmuls is even and splits
    evenly over CPU threads. Probabilities are float32: y = softmax(s) @ v, and received adds
    up the rows of softmax(s). `scratch` (a dict the caller keeps, e.g. the cache's) lends the
    large work buffers from one layer to the next: on CPU, fresh memory for every layer costs
    a third of this function's extra time over flash attention in page faults.
    """
    B, H, T, D = q.shape
    kv, group = k.shape[1], H // k.shape[1]
    block = block or (64 if q.device.type == "cpu" else 512)   # 64: a block's logits stay in a CPU core's cache
    scratch = {} if scratch is None else scratch

    def buffer(name: str, shape) -> torch.Tensor:             # float32 work memory, reused when it fits
        size = math.prod(shape)
        if name not in scratch or scratch[name].numel() < size:
            scratch[name] = torch.empty(size, device=q.device)
        return scratch[name][:size].view(shape)

    queries = (q.float() * D ** -0.5).view(B, kv, group, T, D)
    keys_t = buffer("keys", (B * kv, 2, D, T))                  # each KV head twice, transposed
    keys_t.copy_(k.transpose(2, 3).reshape(B * kv, 1, D, T).expand(-1, 2, -1, -1))
    values = buffer("values", (B * kv, 2, T, D))
    values.copy_(v.reshape(B * kv, 1, T, D).expand(-1, 2, -1, -1))
    most = B * kv * group * min(block, T) * T                   # a block's logits, at most
    logits_buffer, probs_buffer = buffer("logits", (most,)), buffer("probs", (most,))
    y = torch.empty(B, kv, group, T, D, device=q.device)
    received = torch.zeros(B * kv, 2, T, device=q.device)
    future = torch.ones(block, block, dtype=torch.bool, device=q.device).triu(1)
    for start in range(0, T, block):
        end = min(start + block, T)
        n = end - start
        halves = 2 if group * n % 2 == 0 else 1                 # an odd last block runs as one matmul per KV head
        shape = (B * kv * halves, group * n // halves, end)     # (matmuls, stacked query rows, keys seen)
        size = math.prod(shape)
        rows = queries[:, :, :, start:end].reshape(shape[:2] + (D,))
        logits = torch.bmm(rows, keys_t[:, :halves, :, :end].reshape(-1, D, end), out=logits_buffer[:size].view(shape))
        if mask is None:
            logits.view(B, kv, group, n, end)[..., start:].masked_fill_(future[:n, :n], -math.inf)
        else:
            logits.view(B, kv, group, n, end).masked_fill_(~mask[:, :, None, start:end, :end], -math.inf)
        probs = torch.softmax(logits, -1, out=probs_buffer[:size].view(shape))
        y[:, :, :, start:end] = torch.bmm(probs, values[:, :halves, :end].reshape(-1, end, D)).view(B, kv, group, n, D)
        ones = torch.ones(shape[0], 1, shape[1], device=q.device)
        received[:, :halves, :end] += torch.bmm(ones, probs).view(B * kv, halves, end)   # sum over the queries
    return y.view(B, H, T, D).to(q.dtype), received.sum(1).view(B, kv, T)


def knorm(queries, keys, values, spans, layer):
    """K-norm: keep the keys with the lowest L2 norm (RoPE does not change it)."""
    return -keys.float().norm(dim=-1)


def snapkv(queries, keys, values, spans, layer, window: int = 16, kernel: int = 5):
    """SnapKV: attention from the last `window` queries, averaged, smoothed by average pooling.

    Each span gets its own observation window at its end (the window is split evenly across
    spans: 8 + 8 of 16 for two). A window's queries attend causally to all keys; we keep
    the columns of their own span, drop the window's own columns, mean over the window's
    queries, then average-pool (kernel 5, zero padding counted, stride 1) and GQA-average.
    The windows are always kept. A span no longer than its window shrinks the window to
    leave at least one token to score.
    """
    H, L = queries.shape[1], keys.shape[2]
    n = len(spans)
    windows = [window // n + (1 if j < window % n else 0) for j in range(n)]
    scores = torch.zeros(H, L, device=keys.device)                                # (H, L)
    protected = torch.zeros(L, dtype=torch.bool, device=keys.device)
    for (start, end), w in zip(spans, windows):
        w = max(0, min(w, end - start - 1))
        if w == 0:
            continue
        rows = torch.arange(end - w, end, device=keys.device)
        attn = attention_probs(queries[0, :, rows], keys, rows)                   # (H, w, L)
        local = attn[:, :, start:end - w].mean(1)                                 # (H, span - w)
        scores[:, start:end - w] = F.avg_pool1d(local[None], kernel, stride=1, padding=kernel // 2)[0]
        protected[end - w:end] = True
    scores = gqa_mean(scores, keys.shape[1])
    scores[..., protected] = INF
    return scores


def tova(queries, keys, values, spans, layer):
    """TOVA: the last token's attention, averaged over ALL query heads: one selection per layer.

    With partitions, each span's last token is its anchor and scores the span's keys.
    The anchors are always kept.
    """
    L = keys.shape[2]
    scores = torch.zeros(L, device=keys.device)
    for start, end in spans:
        anchor = torch.tensor([end - 1], device=keys.device)
        attn = attention_probs(queries[0, :, anchor], keys, anchor)               # (H, 1, L)
        scores[start:end] = attn[:, 0, start:end].mean(0)
        scores[end - 1] = INF
    return scores.expand(1, keys.shape[1], L)


def random(queries, keys, values, spans, layer, seed: int = 0):
    """Baseline: uniform random scores per KV head (the same draw in every layer)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, keys.shape[1], keys.shape[2], generator=generator).to(keys.device)


def full(queries, keys, values, spans, layer):
    """Baseline: no eviction (Compression.budget keeps everything)."""
    return torch.zeros(1, keys.shape[1], keys.shape[2], device=keys.device)


POLICIES = {
    "streaming_llm": streaming_llm,
    "h2o": h2o,
    "knorm": knorm,
    "snapkv": snapkv,
    "tova": tova,
    "random": random,
    "full": full,
}

# policies that read what the system prefill's attention computes: the attention function the
# cache runs instead of flash attention in that prefill (it returns the output and the record)
OBSERVERS = {"h2o": attention_with_received}


# ----------------------------------------------------------------------------- allocations

def uniform(plain, L: int, n_kept: int, layer: Layer, ratio: float) -> int:
    """The paper's budget: n_kept = max(1, int(L (1 - r))) in every layer and every KV head."""
    return n_kept


def pyramid(plain, L: int, n_kept: int, layer: Layer, ratio: float, window: int = 16, beta: int = 20) -> int:
    """PyramidKV (Cai et al., arXiv 2406.02069), as kvpress 0.5.5's PyramidKVPress.get_layer_budget.

    Budgets fall linearly from the first layer to the last, the same for every KV head of a
    layer, with a mean of about L (1 - r) over the layers. `window` is the part of every budget
    the pyramid sets aside (kvpress ties it to SnapKV's window; here any policy may use it);
    `beta` sets the steepness. When the pyramid does not fit (a short turn or a low ratio),
    every layer keeps round(L (1 - r)).
    """
    capacity = window + L * (1 - ratio)
    low = (capacity - window) / beta
    high = (capacity - window) * 2 - low
    if high >= L - window:
        high = L - window
        low = (capacity - window) * 2 - high
    if not L >= high >= low >= window:
        return max(1, round(L * (1 - ratio)))
    step = (high - low) / (layer.count - 1) if layer.count > 1 else 0.0
    return max(1, round(high - layer.index * step))


def adakv(plain, L: int, n_kept: int, layer: Layer, ratio: float, alpha: float = 0.2) -> torch.Tensor:
    """AdaKV (Feng et al., arXiv 2407.11550), as kvpress 0.5.5's AdaKVPress: budgets adapt per KV head.

    The layer keeps H_kv * n_kept entries in all. Each head first keeps its best
    max(1, int(n_kept * alpha)) (the safeguard); the rest of the layer's budget goes to the best
    remaining scores over all heads together, so heads whose scores stand out keep more.
    Ranking is by tier (protected, whitelisted, rest), then score. Returns counts (H_kv,).
    """
    scores, tier = plain()                                                        # (H_kv, L)
    H = scores.shape[0]
    tier = torch.zeros_like(scores, dtype=torch.long) if tier is None else tier
    safe = max(1, int(n_kept * alpha)) if alpha > 0 else 0
    safeguard = torch.zeros_like(tier)
    safeguard.scatter_(1, ranked(scores, tier)[:, :safe], 1)                      # each head's best `safe`
    order = ranked(scores.reshape(1, -1), tier.reshape(1, -1), safeguard.reshape(1, -1))[0]
    return torch.bincount(order[:H * n_kept] // L, minlength=H)                   # (H_kv,)


ALLOCATIONS = {"uniform": uniform, "pyramid": pyramid, "adakv": adakv}


# ----------------------------------------------------------------------------- from scores to kept positions

@dataclass
class Compression:
    """What to evict from a system turn of L tokens.

    ratio      fraction evicted, 0 <= r < 1; the budget n_kept = max(1, int(L * (1 - r)))
    allocation how the budget becomes counts per layer and KV head (ALLOCATIONS): "uniform"
               (n_kept everywhere: the paper's), "pyramid" (PyramidKV: more in early layers),
               "adakv" (AdaKV: per KV head, from the scores); settings in allocation_options,
               e.g. {"alpha": 0.1} or {"window": 32, "beta": 10}
    partitions token spans (start, end) of the instructions for fair eviction; tokens outside
               them go to a neighbour (the first partition owns the head, the last the tail,
               a gap goes to the partition before it)
    whitelist  token positions never evicted, within the same budget. If the budget is smaller
               than the whitelist, the budget wins: the best-scored whitelisted tokens stay
               and cache.compress reports the fraction of the whitelist kept.
    debias     with partitions: 1 = fair eviction; 0 = the plain policy; in between, each span's
               budget is (1 - debias) * what the plain policy keeps there + debias * its fair
               share (per KV head, rounded by largest remainder), filled by span-local scores.
    options    keyword settings for the score function, e.g. {"window": 32}
    """
    policy: str = "full"
    ratio: float = 0.0
    partitions: list[tuple[int, int]] | None = None
    whitelist: list[int] | None = None
    debias: float = 1.0
    options: dict = field(default_factory=dict)
    allocation: str = "uniform"
    allocation_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r} (choose from {', '.join(ALLOCATIONS)})")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"compression ratio {self.ratio} is outside [0, 1)")
        if not 0.0 <= self.debias <= 1.0:
            raise ValueError(f"debias {self.debias} is outside [0, 1]")

    def budget(self, L: int) -> int:
        if self.policy == "full" or self.ratio == 0:
            return L
        return max(1, int(L * (1 - self.ratio)))  # kvpress's int(), plus its later clamp to 1


def reads_received(spec: Compression) -> bool:
    """Whether compressing with `spec` reads what its policy's observer records in the prefill."""
    plain_scores = not spec.partitions or spec.debias < 1 or spec.allocation == "adakv"   # fair: span by span
    return spec.policy in OBSERVERS and spec.ratio > 0 and plain_scores


def prefill_observer(specs: list[Compression]):
    """The attention function a system prefill should run so that these specs' policies can read it, or None."""
    wanted = {spec.policy for spec in specs if reads_received(spec)}
    if len(wanted) > 1:
        raise ValueError(f"one prefill can observe for one policy, not {sorted(wanted)}: batch them apart")
    return OBSERVERS[wanted.pop()] if wanted else None


def covering_spans(partitions, L: int) -> list[tuple[int, int]]:
    """Stretch sorted, disjoint partitions into contiguous spans that cover [0, L)."""
    parts = sorted(partitions)
    for (s, e), nxt in zip(parts, parts[1:] + [(L, L)]):
        if not 0 <= s < e <= nxt[0]:
            raise ValueError(f"partitions must be non-empty, inside [0, {L}) and disjoint; got {parts}")
    starts = [0] + [s for s, _ in parts[1:]]
    ends = starts[1:] + [L]
    return list(zip(starts, ends))


def largest_remainder(weights: torch.Tensor, total) -> torch.Tensor:
    """Integers proportional to `weights` (..., n) summing exactly to `total` (int or (..., 1)) along the last dim."""
    exact = weights / weights.sum(-1, keepdim=True) * total
    counts = exact.floor().long()
    short = total - counts.sum(-1, keepdim=True)                                  # (..., 1)
    order = (exact - counts).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
    return counts + (order < short).long()


def tiers(scores: torch.Tensor, whitelist: list[int] | None) -> torch.Tensor | None:
    """Selection tier of each key (H, L): 2 = protected (+inf), 1 = whitelisted, 0 = the rest; None without a whitelist.

    Keys are chosen tier by tier and by score inside a tier. Lifting whitelisted scores by a
    constant instead would round attention-sized scores (1e-6 .. 1e-3) into ties in float32.
    """
    if not whitelist:
        return None
    tier = torch.zeros(scores.shape, dtype=torch.long, device=scores.device)
    tier[:, list(whitelist)] = 1
    return tier.masked_fill_(scores == INF, 2)


def ranked(scores: torch.Tensor, *levels: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim, best first: by the last level, then the one before, ..., then by score."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    for level in levels:
        order = order.gather(-1, level.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    return order


def top_k(scores: torch.Tensor, tier: torch.Tensor | None, k: int) -> torch.Tensor:
    """Indices of the best k keys along the last dim: by tier first, then by score (H, n) -> (H, k)."""
    if tier is None:
        return scores.topk(k, dim=-1).indices
    return ranked(scores, tier)[..., :k]


def top_per_span(scores: torch.Tensor, tier, spans, quotas: torch.Tensor) -> torch.Tensor:
    """Kept mask (H, L): the best quotas[h, j] keys of span j for head h; scores (H, L), quotas (H, n_spans)."""
    kept = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for (s, e), quota in zip(spans, quotas.T.tolist()):
        for h, q in enumerate(quota):                     # one head at a time: each its own quota
            kept[h, s:e].scatter_(0, top_k(scores[h, s:e], None if tier is None else tier[h, s:e], q), True)
    return kept


def select_kept(spec: Compression, queries, keys, values, layer: Layer | None = None) -> torch.Tensor:
    """Kept mask (H_kv, L) for one row and one layer: the allocation's count per KV head, chosen by score."""
    H, L = keys.shape[1], keys.shape[2]
    layer = layer or Layer(0, 1)
    n_kept = spec.budget(L)
    if n_kept >= L:
        return torch.ones(H, L, dtype=torch.bool, device=keys.device)
    if spec.whitelist and not all(0 <= p < L for p in spec.whitelist):
        raise ValueError(f"whitelist positions must lie inside the system turn [0, {L})")

    def scored(spans):                     # the policy's scores (H, L) and their tiers
        scores = POLICIES[spec.policy](queries, keys, values, spans, layer, **spec.options)[0]
        return scores, tiers(scores, spec.whitelist)

    whole = [(0, L)]
    plain = functools.cache(lambda: scored(whole))   # the whole-turn scores, computed once, only if needed

    counts = ALLOCATIONS[spec.allocation](plain, L, n_kept, layer, spec.ratio, **spec.allocation_options)
    counts = torch.as_tensor(counts).expand(H).cpu()                              # (H,) per KV head
    if not spec.partitions or spec.debias == 0:
        return top_per_span(*plain(), whole, counts[:, None])
    spans = covering_spans(spec.partitions, L)
    lengths = torch.tensor([float(e - s) for s, e in spans])
    quotas = largest_remainder(lengths.expand(H, -1), counts[:, None])            # (H, n_spans) fair shares
    if spec.debias < 1:
        plain_kept = top_per_span(*plain(), whole, counts[:, None]).cpu()        # (H, L)
        plain_counts = torch.stack([plain_kept[:, s:e].sum(-1) for s, e in spans], -1)
        blend = (1 - spec.debias) * plain_counts + spec.debias * quotas
        quotas = largest_remainder(blend.float(), counts[:, None])
    return top_per_span(*scored(spans), spans, quotas)


# ----------------------------------------------------------------------------- compression during decoding

# How many of the newest queries a policy reads, from its options. Decoding keeps only the
# queries of the last `buffer` decode tokens; a policy absent from this table reads the query of
# every key it scores (H2O) and cannot run during decoding.
DECODE_QUERIES = {
    "streaming_llm": lambda options: 0,
    "knorm": lambda options: 0,
    "random": lambda options: 0,
    "snapkv": lambda options: options.get("window", 16),
    "tova": lambda options: 1,
}

WHITELISTED = 3       # the decode-time tier of a whitelisted key: above even a policy's protected (+inf) keys


@dataclass
class Decoding:
    """Compression while the answer grows (kvpress DecodingPress semantics, docs/method.md).

    Every `interval`-th decode forward, each layer's whole cache (prompt, answer so far, the
    current token) is cut to `target` entries per KV head by `policy` and `allocation`. The
    policy sees the post-RoPE queries of the last min(buffer, interval) decode tokens, each at
    its own position.

    rerotate   after each cut, re-rotate the kept keys to positions 0 .. n-1 and continue at n
    whitelist  original positions (of the system turn) that no cut ever evicts; the target must
               exceed their number
    partitions spans (start, end) of the system turn for fair eviction: with the generated text
               as one more partition, each cut keeps the same fraction of every partition
    """
    policy: str
    target: int
    interval: int = 16
    buffer: int = 16
    allocation: str = "uniform"
    options: dict = field(default_factory=dict)
    allocation_options: dict = field(default_factory=dict)
    rerotate: bool = False
    whitelist: list[int] | None = None
    partitions: list[tuple[int, int]] | None = None

    def __post_init__(self):
        for name in ("target", "interval", "buffer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"decode {name} must be an integer >= 1, got {value!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        if self.policy == "full":
            raise ValueError("decoding with policy 'full' evicts nothing: choose an evicting policy or leave decoding off")
        if self.policy not in DECODE_QUERIES:
            usable = ", ".join(DECODE_QUERIES)
            raise ValueError(f"{self.policy} reads the query of every cached token, and decoding keeps only the "
                             f"last --decode-buffer queries: choose one of {usable} for decoding")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r} (choose from {', '.join(ALLOCATIONS)})")
        needed, seen = self.queries_needed(), min(self.buffer, self.interval)
        if needed > seen:
            raise ValueError(f"{self.policy} reads the last {needed} queries, but a decode cut sees {seen} "
                             f"(buffer {self.buffer}, interval {self.interval}): raise both to at least {needed}")
        if self.whitelist and len(set(self.whitelist)) >= self.target:
            raise ValueError(f"decode target {self.target} must exceed the {len(set(self.whitelist))} whitelisted "
                             f"positions that no cut evicts")

    def queries_needed(self) -> int:
        return DECODE_QUERIES[self.policy](self.options)


def decode_spans(partitions, generated_from: int) -> list[int]:
    """First original position of each decode-time partition: the system turn's, stretched as in
    covering_spans (the user turn joins the last one), then the generated text from `generated_from`."""
    if not partitions:
        return [0]
    spans = covering_spans(partitions, generated_from)
    return [start for start, _ in spans] + [generated_from]


def decode_kept(spec: Decoding, scores: torch.Tensor, present: torch.Tensor, positions: torch.Tensor,
                layer: Layer, generated_from: int) -> torch.Tensor:
    """Kept mask (H_kv, S) of one row and layer at a decode cut.

    scores (H_kv, S) the policy's; present (H_kv, S) which slots hold an entry (packed at the
    front of each head; S = the longest head); positions (H_kv, S) their original positions.
    The allocation gives each head its count (at most what it holds); a head keeps its best
    entries by tier (whitelisted, then protected, then the rest) and score. With partitions,
    each head's count is split over the partitions in proportion to what it holds of each
    (largest remainder), and each partition keeps its best.
    """
    H, S = scores.shape
    held = present.sum(-1).cpu()                                                  # (H,)
    scores = scores.float().masked_fill(~present, -INF)
    tier = None
    if spec.whitelist:
        tier = torch.zeros(H, S, dtype=torch.long, device=scores.device)
        tier.masked_fill_(scores == INF, 2)
        tier.masked_fill_(torch.isin(positions, torch.tensor(spec.whitelist, device=positions.device)), WHITELISTED)
        tier.masked_fill_(~present, -1)
    plain = lambda: (scores, tier)
    counts = ALLOCATIONS[spec.allocation](plain, S, spec.target, layer, 1 - spec.target / S, **spec.allocation_options)
    counts = torch.minimum(torch.as_tensor(counts).expand(H).cpu(), held)         # (H,)
    if not spec.partitions:
        return top_per_span(scores, tier, [(0, S)], counts[:, None])
    starts = torch.tensor(decode_spans(spec.partitions, generated_from), device=positions.device)
    span_of = torch.searchsorted(starts, positions, right=True) - 1               # (H, S) partition of each entry
    span_of = span_of.masked_fill(~present, -1)
    n_spans = len(starts)
    sizes = torch.stack([(span_of == j).sum(-1) for j in range(n_spans)], -1).cpu().float()   # (H, n_spans)
    quotas = largest_remainder(sizes, counts[:, None])                            # (H, n_spans)
    kept = torch.zeros(H, S, dtype=torch.bool, device=scores.device)
    for h in range(H):
        for j, quota in enumerate(quotas[h].tolist()):
            slots = (span_of[h] == j).nonzero()[:, 0]
            if quota > 0:
                best = top_k(scores[h, slots], None if tier is None else tier[h, slots], quota)
                kept[h, slots[best]] = True
    return kept
