"""Eviction policies: each is a score function, higher = keep. Then the code that turns
scores into kept positions, written once for all of them: budgets, protected tokens,
whitelists, and fair eviction over partitions (docs/method.md).

A policy is called on one row of the system turn's prefill:

    scores = policy(queries, keys, values, spans, **options)   # -> (1, H_kv, L)

    queries (1, H, L, D)     post-RoPE, as the attention layer computed them
    keys    (1, H_kv, L, D)  post-RoPE, as cached
    values  (1, H_kv, L, D)
    spans   [(start, end), ...] contiguous token spans covering [0, L): one span for the
            plain policy, one per partition for fair eviction. A policy scores every span
            on its own terms (its own window, its own anchor, its own recency), and the
            selection gives each span its share of the budget.

H2O may also be handed `received` (1, H_kv, L): the attention each key received during the
prefill, summed over queries and the query heads sharing the KV head. The prefill computes
it when `cache.record_received` is on (model.attention_with_received), far cheaper than a
second pass over every q . k; without it, h2o computes the same sums itself.

Tokens a policy must never drop (sinks, SnapKV's window, TOVA's anchor) get +inf.
Attention probabilities are computed in float32. Adding a policy = one function and one
line in POLICIES.
"""
from __future__ import annotations

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


# ----------------------------------------------------------------------------- policies

def streaming_llm(queries, keys, values, spans, n_sink: int = 4):
    """StreamingLLM: keep the first `n_sink` tokens and the most recent ones.

    Recency is the position itself, so within each span the latest tokens win: with
    partitions this is the paper's per-span recency ramp.
    """
    L = keys.shape[2]
    scores = torch.arange(L, dtype=torch.float32, device=keys.device)
    scores[:n_sink] = INF
    return scores.expand(1, keys.shape[1], L)


def h2o(queries, keys, values, spans, received=None, block: int = 32):
    """H2O as kvpress's ObservedAttention: mean attention a key receives from the queries that see it.

    score[k] = sum_q A[q, k] / (number of queries that see k), GQA mean. The plain policy takes
    the sums from the prefill when it recorded them (`received`). With partitions, the
    attention that a later span's queries pay to an earlier span's keys is removed, so a key
    counts only its own span's queries (softmax rows are not renormalised). The sums are
    accumulated over blocks of `block` queries, each reading only the keys it can see: memory
    O(block * L) per head, never L x L. A block never straddles two spans, so the keys of the
    block's own span are one slice.
    """
    H, L = queries.shape[1], keys.shape[2]
    if received is not None and len(spans) == 1:
        seen_by = torch.arange(L, 0, -1, device=keys.device)                      # L - k queries see key k
        return received / (H // keys.shape[1]) / seen_by
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


def knorm(queries, keys, values, spans):
    """K-norm: keep the keys with the lowest L2 norm (RoPE does not change it)."""
    return -keys.float().norm(dim=-1)


def snapkv(queries, keys, values, spans, window: int = 16, kernel: int = 5):
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


def tova(queries, keys, values, spans):
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


def random(queries, keys, values, spans, seed: int = 0):
    """Baseline: uniform random scores per KV head (the same draw in every layer)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, keys.shape[1], keys.shape[2], generator=generator).to(keys.device)


def full(queries, keys, values, spans):
    """Baseline: no eviction (Compression.budget keeps everything)."""
    return torch.zeros(1, keys.shape[1], keys.shape[2], device=keys.device)


# the policies that read `received` when the prefill recorded it (cache.record_received)
READS_RECEIVED = {"h2o"}

POLICIES = {
    "streaming_llm": streaming_llm,
    "h2o": h2o,
    "knorm": knorm,
    "snapkv": snapkv,
    "tova": tova,
    "random": random,
    "full": full,
}


# ----------------------------------------------------------------------------- from scores to kept positions

@dataclass
class Compression:
    """What to evict from a system turn of L tokens.

    ratio      fraction evicted, 0 <= r < 1; n_kept = max(1, int(L * (1 - r))) per layer and KV head
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

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"compression ratio {self.ratio} is outside [0, 1)")
        if not 0.0 <= self.debias <= 1.0:
            raise ValueError(f"debias {self.debias} is outside [0, 1]")

    def budget(self, L: int) -> int:
        if self.policy == "full" or self.ratio == 0:
            return L
        return max(1, int(L * (1 - self.ratio)))  # kvpress's int(), plus its later clamp to 1


def reads_received(spec: Compression) -> bool:
    """Whether compressing with `spec` can use the attention sums a prefill records (cache.record_received)."""
    plain_scores = not spec.partitions or spec.debias < 1           # fair eviction scores span by span
    return spec.policy in READS_RECEIVED and spec.ratio > 0 and plain_scores


def covering_spans(partitions, L: int) -> list[tuple[int, int]]:
    """Stretch sorted, disjoint partitions into contiguous spans that cover [0, L)."""
    parts = sorted(partitions)
    for (s, e), nxt in zip(parts, parts[1:] + [(L, L)]):
        if not 0 <= s < e <= nxt[0]:
            raise ValueError(f"partitions must be non-empty, inside [0, {L}) and disjoint; got {parts}")
    starts = [0] + [s for s, _ in parts[1:]]
    ends = starts[1:] + [L]
    return list(zip(starts, ends))


def largest_remainder(weights: torch.Tensor, total: int) -> torch.Tensor:
    """Integers proportional to `weights` (..., n) summing exactly to `total` along the last dim."""
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


def top_k(scores: torch.Tensor, tier: torch.Tensor | None, k: int) -> torch.Tensor:
    """Indices of the best k keys along the last dim: by tier first, then by score (H, n) -> (H, k)."""
    if tier is None:
        return scores.topk(k, dim=-1).indices
    order = scores.argsort(dim=-1, descending=True, stable=True)                  # by score ...
    by_tier = tier.gather(-1, order).argsort(dim=-1, descending=True, stable=True)
    return order.gather(-1, by_tier)[..., :k]                                     # ... then by tier


def top_per_span(scores: torch.Tensor, tier, spans, quotas: torch.Tensor) -> torch.Tensor:
    """Top-quota positions in each span for each head; scores (H, L), quotas (H, n_spans). -> (H, n_kept) sorted."""
    kept = []
    for h in range(scores.shape[0]):
        picks = [top_k(scores[h, s:e], None if tier is None else tier[h, s:e], int(q)) + s
                 for (s, e), q in zip(spans, quotas[h])]
        kept.append(torch.cat(picks).sort().values)
    return torch.stack(kept)


def select_kept(spec: Compression, queries, keys, values, received=None) -> torch.Tensor:
    """Kept positions (H_kv, n_kept), sorted, for one row and one layer."""
    H, L = keys.shape[1], keys.shape[2]
    n_kept = spec.budget(L)
    if n_kept >= L:
        return torch.arange(L, device=keys.device).expand(H, L)
    if spec.whitelist and not all(0 <= p < L for p in spec.whitelist):
        raise ValueError(f"whitelist positions must lie inside the system turn [0, {L})")

    options = spec.options
    if received is not None and reads_received(spec):      # H2O: the sums the prefill recorded
        options = dict(options, received=received)

    def scored(spans):                     # the policy's scores (H, L) and their tiers
        scores = POLICIES[spec.policy](queries, keys, values, spans, **options)[0]
        return scores, tiers(scores, spec.whitelist)

    whole = [(0, L)]
    if not spec.partitions or spec.debias == 0:
        return top_per_span(*scored(whole), whole, torch.full((H, 1), n_kept))
    spans = covering_spans(spec.partitions, L)
    lengths = torch.tensor([float(e - s) for s, e in spans])
    quotas = largest_remainder(lengths, n_kept).expand(H, -1)                     # (H, n_spans) fair shares
    if spec.debias < 1:
        plain_kept = top_k(*scored(whole), n_kept).cpu()                           # (H, n_kept)
        plain_counts = torch.stack([((plain_kept >= s) & (plain_kept < e)).sum(-1) for s, e in spans], -1)
        blend = (1 - spec.debias) * plain_counts + spec.debias * quotas
        quotas = largest_remainder(blend.float(), n_kept)
    return top_per_span(*scored(spans), spans, quotas)
