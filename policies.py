"""Eviction policies, budget allocations, and the one pipeline that turns their scores into kept entries
(docs/method.md sections 3-5).

A policy is a score function, higher = keep, called on what one row holds in one layer:

    scores = policy(queries, keys, values, spans, context, **options)   # -> (1, H_kv, n)

with queries (1, H, n, D) post-RoPE (NaN where the protocol has none: a decode cut keeps only the
newest), keys and values (1, H_kv, n, D) as cached, in original-position order, spans [(start,
end), ...] covering [0, n) (one per partition under fair eviction: each span is scored on its own
terms), and a Context (layer, what the prefill observed, RoPE frequencies). Entries a policy must
never drop (sinks, SnapKV's window, TOVA's anchor) get +inf; attention is computed in float32.

An allocation turns every layer's scores into how many entries each (layer, KV head) keeps:

    counts = allocation(plain, held, budget, ratio, **options)   # -> (n_layers, H_kv)

with plain[layer]() the layer's whole-turn (scores, tiers), computed on first use; held (n_layers,
H_kv) the entries each head may lose; budget the mean a head keeps (L (1 - r) at the prefill, the
target at a decode cut); ratio the prefill's r (None at a cut). The allocation decides how many,
the remedies which: entries are ranked tier by tier (protected, whitelisted, the rest), then by
score, and fair eviction gives each partition its share of every head's count.

`evict_row` is that pipeline for one row and every layer; the protocols (the prefill, here; decode
cuts, decoding.py) differ only in what they hand it. Adding a policy = one function and one line in
POLICIES; adding an allocation = one function and one line in ALLOCATIONS.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model import apply_rope, pad, rope_cos_sin

INF = float("inf")


# ----------------------------------------------------------------------------- helpers

def attention_probs(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention (float32) of queries (H, n, D) at `query_positions` (n,) over keys (1, H_kv, S, D):
    (H, n, S). Query head h reads KV head h // (H / H_kv); a KV head's query heads share one matmul."""
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


def check(ok: bool, message: str):
    """How a policy or an allocation refuses an option it cannot work with, in its first lines: a ValueError
    naming it (flags.py tries every option on a small input, so the refusal comes before anything loads)."""
    if not ok:
        raise ValueError(message)


@dataclass
class Context:
    """Where a policy scores: which layer (a policy may depend on depth), and what else it may read."""
    layer: int                              # 0 .. n_layers - 1
    n_layers: int
    observed: torch.Tensor | None = None    # what the prefill's observer recorded, e.g. H2O's sums (1, H_kv, L)
    inv_freq: torch.Tensor | None = None    # the model's RoPE frequencies (D/2,), to undo or predict RoPE


# ----------------------------------------------------------------------------- policies

def streaming_llm(queries, keys, values, spans, context, n_sink: int = 4):
    """StreamingLLM: keep the first `n_sink` tokens and the most recent ones.

    Recency is the position itself, so within each span the latest tokens win: with
    partitions this is the paper's per-span recency ramp.
    """
    check(n_sink >= 0, f"streaming_llm needs n_sink >= 0, not {n_sink}")
    L = keys.shape[2]
    scores = torch.arange(L, dtype=torch.float32, device=keys.device)
    scores[:n_sink] = INF
    return scores.expand(1, keys.shape[1], L)


def h2o(queries, keys, values, spans, context, block: int = 32):
    """H2O as kvpress's ObservedAttention: the mean attention a key receives from the queries that see it.

    score[k] = sum_q A[q, k] / (queries that see k), GQA mean; with partitions a key counts only its
    own span's queries (rows not renormalised). The plain policy reads the sums its observer took in
    the prefill (`context.observed`); otherwise they are summed over blocks of `block` queries, memory
    O(block * L) per head, never L x L.
    """
    check(block >= 1, f"h2o needs block >= 1, not {block}")
    H, L = queries.shape[1], keys.shape[2]
    if context.observed is not None and len(spans) == 1:
        seen_by = torch.arange(L, 0, -1, device=keys.device)                      # L - k queries see key k
        return context.observed / (H // keys.shape[1]) / seen_by
    queries, keys = queries.float(), keys.float()                                 # convert once, not per block
    totals = torch.zeros(H, L, device=keys.device)                                # (H, L)
    n_queries = torch.zeros(L, device=keys.device)                                # (L,) queries that see k
    for span_start, span_end in spans:
        for start in range(span_start, span_end, block):
            end = min(start + block, span_end)
            rows = torch.arange(start, end, device=keys.device)
            attn = attention_probs(queries[0, :, start:end], keys[:, :, :end], rows)  # (H, n, end)
            totals[:, span_start:end] += attn[..., span_start:].sum(1)
        n_queries[span_start:span_end] = torch.arange(span_end - span_start, 0, -1, device=keys.device)
    return gqa_mean(totals / n_queries, keys.shape[1])


def attention_with_received(q, k, v, mask, block: int | None = None, scratch: dict | None = None):
    """H2O's observer: attention over a chunk that starts the cache, which also sums what each key receives.

    q (B, H, T, D); k, v (B, H_kv, T, D); mask None (causal) or (B, 1, T, T). Returns the output
    (B, H, T, D) and received (B, H_kv, T), float32: the sum over a KV head's query heads and over
    the queries of softmax(q . k), a fraction of the cost of a second pass. Blocks of `block` queries
    bound memory to O(block * T) per head; the stacked query heads run as two even matmuls (CPU
    threads split them evenly); `scratch` lends the work buffers from layer to layer (fresh memory
    per layer costs a third of the extra time in page faults on CPU).
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


def knorm(queries, keys, values, spans, context):
    """K-norm: keep the keys with the lowest L2 norm (RoPE does not change it)."""
    return -keys.float().norm(dim=-1)


def snapkv(queries, keys, values, spans, context, window: int = 16, kernel: int = 5):
    """SnapKV: attention from the last `window` queries, averaged, smoothed by average pooling.

    Each span gets its share of the window at its end (8 + 8 of 16 for two); its queries' attention
    to the span's other keys is averaged over the queries, average-pooled (zero padding counted)
    and GQA-averaged. The windows get +inf; a span no longer than its window shrinks the window.
    """
    check(window >= 1 and kernel >= 1 and kernel % 2 == 1,
          f"snapkv needs window >= 1 and an odd kernel >= 1, not window={window}, kernel={kernel}")
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


def tova(queries, keys, values, spans, context):
    """TOVA: the last token's attention averaged over ALL query heads, one selection per layer; with
    partitions each span's last token scores the span. The anchors get +inf."""
    L = keys.shape[2]
    scores = torch.zeros(L, device=keys.device)
    for start, end in spans:
        anchor = torch.tensor([end - 1], device=keys.device)
        attn = attention_probs(queries[0, :, anchor], keys, anchor)               # (H, 1, L)
        scores[start:end] = attn[:, 0, start:end].mean(0)
        scores[end - 1] = INF
    return scores.expand(1, keys.shape[1], L)


def random(queries, keys, values, spans, context, seed: int = 0):
    """Baseline: uniform random scores per KV head (the same draw in every layer, drawn on the CPU: the same
    on every device)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, keys.shape[1], keys.shape[2], generator=generator, device="cpu").to(keys.device)


def full(queries, keys, values, spans, context):
    """Baseline: no eviction (Compression.n_kept keeps everything)."""
    return torch.zeros(1, keys.shape[1], keys.shape[2], device=keys.device)


def expected_attention(queries, keys, values, spans, context, n_future: int = 512, n_sink: int = 4,
                       covariance: bool = True, value_norm: bool = True, epsilon: float = 0.0):
    """Expected Attention (kvpress ExpectedAttentionPress): the attention a key can expect from future queries.

    The queries at positions L .. L + n_future - 1 are a Gaussian: the mean mu and covariance S of
    the turn's pre-RoPE queries (RoPE undone; sinks left out) moved by the average future rotation
    R. E[exp(q . k / sqrt(D))] = exp(k . R mu / sqrt(D) + k^T R S R^T k / 2D) gives each key's
    expected logit: softmax over the keys, GQA mean, then (score + epsilon) x ||value||. Sinks +inf.
    """
    check(n_future >= 1 and n_sink >= 0 and epsilon >= 0,
          f"expected_attention needs n_future >= 1, n_sink >= 0 and epsilon >= 0, not {n_future}, {n_sink}, {epsilon}")
    H, L, D = queries.shape[1:]
    kv_heads = keys.shape[1]
    scores = torch.full((1, kv_heads, L), INF, device=keys.device)                # (1, H_kv, L)
    if L <= n_sink:
        return scores
    if context.inv_freq is None:
        raise ValueError("expected_attention needs the model's RoPE frequencies (Context.inv_freq; model.new_cache() "
                         "gives them to the cache)")
    inv_freq = context.inv_freq.float().to(keys.device)
    cos, sin = rope_cos_sin(inv_freq, -torch.arange(L, device=keys.device)[None], torch.float32)   # undo RoPE
    pre_rope = apply_rope(queries.float(), cos, sin)[0, :, n_sink:]               # (H, L - n_sink, D)
    mean = pre_rope.mean(1)                                                       # (H, D)
    centred = pre_rope - mean[:, None]
    cov = centred.transpose(1, 2) @ centred / centred.shape[1]                    # (H, D, D)
    # RoPE at position p is linear in x: x -> cos(p f) x + sin(p f) rotate_half(x); its mean over the future, a matrix R
    cos, sin = rope_cos_sin(inv_freq, torch.arange(L, L + n_future, device=keys.device)[None], torch.float32)
    R = apply_rope(torch.eye(D, device=keys.device), cos[0, 0].mean(0), sin[0, 0].mean(0)).T   # (D, D): R e_i = row i
    mean, cov = mean @ R.T, R @ cov @ R.T
    k = keys[0, :, n_sink:].float().repeat_interleave(H // kv_heads, 0)          # (H, L - n_sink, D)
    logits = (k @ mean[:, :, None])[..., 0] / math.sqrt(D)                        # (H, L - n_sink)
    if covariance:
        logits = logits + ((k @ cov) * k).sum(-1) / D / 2
    expected = gqa_mean(logits.softmax(-1), kv_heads)                             # (1, H_kv, L - n_sink)
    if value_norm:
        expected = (expected + epsilon) * values[:, :, n_sink:].float().norm(dim=-1)
    scores[..., n_sink:] = expected
    return scores


def keydiff(queries, keys, values, spans, context):
    """KeyDiff (kvpress KeyDiffPress): minus each key's cosine similarity to the mean of its span's normalised
    keys, per KV head: keep the keys least like the others."""
    keys = keys.float()
    scores = torch.empty(keys.shape[:3], device=keys.device)                      # (1, H_kv, L)
    for start, end in spans:
        span = keys[:, :, start:end]                                              # (1, H_kv, n, D)
        anchor = F.normalize(span, dim=-1).mean(2, keepdim=True)                  # (1, H_kv, 1, D)
        scores[:, :, start:end] = -F.cosine_similarity(span, anchor, dim=-1)
    return scores


def kvzip(queries, keys, values, spans, context, n_sink: int = 4, plus: bool = False, chunk_size: int = 2048):
    """KVzip (Kim et al., arXiv 2505.23416; kvpress 0.5.5's KVzipPress): keep what the model reads to repeat the turn.

    The most attention a key receives from a replay of the turn (`replay_turns`, in chunks of
    `chunk_size`; with `plus`, KVzip+'s normalisation), recorded as context.observed. The first
    `n_sink` tokens get +inf; the template's header, which is not replayed, scores 0.
    """
    check(n_sink >= 0 and chunk_size >= 1, f"kvzip needs n_sink >= 0 and chunk_size >= 1, not {n_sink} and {chunk_size}")
    if context.observed is None:
        raise ValueError("kvzip scores what a replay of the turn attends to: run it with policies.prefill(..., "
                         "replay=tokenizer.replay(system)), which makes the replay")
    scores = context.observed.float().clone()                                     # (1, H_kv, L)
    scores[..., :n_sink] = math.inf
    return scores


POLICIES = {
    "streaming_llm": streaming_llm,
    "h2o": h2o,
    "knorm": knorm,
    "snapkv": snapkv,
    "tova": tova,
    "expected_attention": expected_attention,
    "keydiff": keydiff,
    "kvzip": kvzip,
    "random": random,
    "full": full,
}

OBSERVERS = {"h2o": attention_with_received}   # policies that read the prefill's attention: its function
REPLAYS = {"kvzip"}                               # policies that score a replay of the turn (prefill's replay=)


def option_defaults(function) -> dict:
    """The settings of a policy or an allocation and their defaults: its parameters that have one."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


# ----------------------------------------------------------------------------- allocations

def uniform(plain, held: torch.Tensor, budget: float, ratio) -> torch.Tensor:
    """The paper's budget: max(1, int(budget)) = max(1, int(L (1 - r))) in every layer and KV head."""
    return torch.full_like(held, max(1, int(budget)))


def pyramid(plain, held: torch.Tensor, budget: float, ratio, window: int = 16, beta: int = 20) -> torch.Tensor:
    """PyramidKV (arXiv 2406.02069; kvpress 0.5.5's get_layer_budget): budgets fall linearly from the first
    layer to the last with a mean of about `budget`; `window` is set aside from each, `beta` sets the slope.
    A layer of L entries the pyramid does not fit keeps round(budget)."""
    check(window >= 0 and beta >= 1, f"pyramid needs window >= 0 and beta >= 1, not {window} and {beta}")
    n_layers = held.shape[0]
    counts = torch.empty_like(held)
    for layer in range(n_layers):
        L = int(held[layer].max())
        low = budget / beta
        high = budget * 2 - low
        if high >= L - window:
            high = L - window
            low = budget * 2 - high
        if not L >= high >= low >= window:
            counts[layer] = max(1, round(budget))
            continue
        step = (high - low) / (n_layers - 1) if n_layers > 1 else 0.0
        counts[layer] = max(1, round(high - layer * step))
    return counts


def adakv(plain, held: torch.Tensor, budget: float, ratio, alpha: float = 0.2) -> torch.Tensor:
    """AdaKV (arXiv 2407.11550; kvpress 0.5.5's AdaKVPress): a layer keeps H_kv n_kept entries; each head its
    best max(1, int(n_kept alpha)) first, then the heads share the rest by tier and score."""
    check(0 <= alpha <= 1, f"adakv needs 0 <= alpha <= 1, not {alpha}")
    n_kept = max(1, int(budget))
    safe = max(1, int(n_kept * alpha)) if alpha > 0 else 0
    return torch.stack([shared(*scored(), safe, held.shape[1] * n_kept) for scored in plain])


def global_budget(plain, held: torch.Tensor, budget: float, ratio, n_sink: int = 4,
                  layerwise: bool = False) -> torch.Tensor:
    """One budget over every layer and KV head (kvpress 0.5.5's KVzipPress), or per layer (`layerwise`).

    Of N entries, N - int(N r) stay (kvpress's count; at a decode cut int(N budget / L)). Each head keeps
    its n_sink best first (KVzip's +inf sinks: no head is emptied), then the best over the whole group.
    """
    check(n_sink >= 0, f"global needs n_sink >= 0, not {n_sink}")
    n_layers, kv_heads = held.shape
    width = max(scored()[0].shape[1] for scored in plain)
    pad = lambda x, fill: F.pad(x, (0, width - x.shape[1]), value=fill)          # noqa: E731
    scores, tiers_ = zip(*(scored() for scored in plain))
    scores = torch.stack([pad(x, -math.inf) for x in scores])                     # (n_layers, H_kv, width)
    tier = torch.stack([pad(torch.zeros_like(x, dtype=torch.long) if t is None else t, -1)
                        for x, t in zip(scores, tiers_)])
    groups = [slice(layer, layer + 1) for layer in range(n_layers)] if layerwise else [slice(0, n_layers)]
    counts = torch.empty_like(held)
    for group in groups:
        total = int(held[group].sum())
        keep = total - int(total * ratio) if ratio is not None else int(total * budget / width)
        counts[group] = shared(scores[group].flatten(0, 1), tier[group].flatten(0, 1), n_sink, keep).view(-1, kv_heads)
    return counts


def shared(scores: torch.Tensor, tier: torch.Tensor | None, safe: int, total: int) -> torch.Tensor:
    """Counts (heads,) when heads share `total` entries: each keeps its best `safe`, the rest go to the best
    remaining (heads, n) scores over all heads, by tier then score."""
    heads, n = scores.shape
    tier = torch.zeros_like(scores, dtype=torch.long) if tier is None else tier
    safeguard = torch.zeros_like(tier)
    safeguard.scatter_(1, ranked(scores, tier)[:, :safe], 1)                      # each head's best `safe`
    safeguard.masked_fill_(scores == -math.inf, 0)                                # of what it holds (-inf: padding)
    order = ranked(scores.reshape(1, -1), tier.reshape(1, -1), safeguard.reshape(1, -1))[0]
    return torch.bincount(order[:total] // n, minlength=heads).cpu()


ALLOCATIONS = {"uniform": uniform, "pyramid": pyramid, "adakv": adakv, "global": global_budget}
RANKING_ALLOCATIONS = {"adakv", "global"}      # allocations that read the policy's whole-turn scores


# ----------------------------------------------------------------------------- what to evict

@dataclass
class Compression:
    """What to evict from a system turn of L tokens, and how (validated once, here).

    ratio       fraction evicted, 0 <= r < 1: n_kept = max(1, int(L (1 - r)))
    allocation  counts per layer and KV head (ALLOCATIONS), with allocation_options
    partitions  token spans for fair eviction (stretched to cover the turn: covering_spans)
    whitelist   positions ranked above the rest, within the budget (the budget wins when it is smaller)
    debias      with partitions: 1 = fair, 0 = the plain policy, between: the two splits blended
    options     keyword settings of the score function, e.g. {"window": 32}
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
        for name, options, function in ((self.policy, self.options, POLICIES[self.policy]),
                                        (self.allocation, self.allocation_options, ALLOCATIONS[self.allocation])):
            known = option_defaults(function)
            unknown = sorted(set(options) - set(known))
            if unknown:
                raise ValueError(f"{name} has no option {unknown[0]!r} (its options: {', '.join(known) or 'none'})")

    def n_kept(self, L: int) -> int:
        if self.policy == "full" or self.ratio == 0:
            return L
        return max(1, int(L * (1 - self.ratio)))  # kvpress's int(), plus its later clamp to 1

    def reads_observed(self) -> bool:
        """Whether compressing reads what the policy's observer records in the prefill (whole-turn scores)."""
        whole = not self.partitions or self.debias < 1 or self.allocation in RANKING_ALLOCATIONS   # fair: by span
        return self.policy in OBSERVERS and self.ratio > 0 and whole


# ----------------------------------------------------------------------------- from scores to kept entries

def covering_spans(partitions, L: int) -> list[tuple[int, int]]:
    """Stretch sorted, disjoint partitions into contiguous spans that cover [0, L)."""
    parts = sorted(partitions)
    for (s, e), nxt in zip(parts, parts[1:] + [(L, L)]):
        if not 0 <= s < e <= nxt[0]:
            raise ValueError(f"partitions must be non-empty, inside [0, {L}) and disjoint; got {parts}")
    starts = [0] + [s for s, _ in parts[1:]]
    ends = starts[1:] + [L]
    return list(zip(starts, ends))


def proportional(weights: torch.Tensor, total) -> torch.Tensor:
    """Integers proportional to `weights` (..., n) summing exactly to `total` (int or (..., 1)) along the last dim:
    part j gets floor(total W_1..j / W) - floor(total W_1..j-1 / W), so of two spans the earlier gets
    floor(b len / L) and the later the rest (the paper's rule)."""
    cumulative = weights.double().cumsum(-1)                                      # float64: exact for counts
    ends = (cumulative * total / cumulative[..., -1:].clamp(min=1e-9)).floor().long()
    ends[..., -1:] = total                     # the whole, exactly (rounding may put a float blend's just below)
    return ends.diff(dim=-1, prepend=torch.zeros_like(ends[..., :1]))


def tiers(scores: torch.Tensor, whitelisted: torch.Tensor | None, present: torch.Tensor) -> torch.Tensor | None:
    """Selection tier of each entry (H, n): 2 = protected (+inf), 1 = whitelisted, 0 = the rest, -1 = absent;
    None without a whitelist. (Lifting whitelisted scores by a constant would round attention-sized
    scores into float32 ties.)"""
    if whitelisted is None:
        return None
    tier = whitelisted.long().masked_fill_(scores == math.inf, 2)
    return tier.masked_fill_(~present, -1)


def ranked(scores: torch.Tensor, *levels: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim, best first: by the last level, then the one before, ..., then by score."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    for level in levels:
        order = order.gather(-1, level.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    return order


def keep_best(scores: torch.Tensor, tier, part: torch.Tensor | None, quotas: torch.Tensor) -> torch.Tensor:
    """Kept mask (H, n): for each head h and part j, its best quotas[h, j] entries of part j (part None: one part)."""
    kept = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    per_head = quotas.tolist()
    if part is None and tier is None and len({q for head in per_head for q in head}) == 1:   # one topk for all
        return kept.scatter_(1, scores.topk(per_head[0][0], dim=-1).indices, True)
    for h, head_quotas in enumerate(per_head):
        for j, quota in enumerate(head_quotas):          # one head at a time: each its own quota
            index = None if part is None else (part[h] == j).nonzero()[:, 0]
            take = (lambda x: x[h]) if index is None else (lambda x: x[h, index])
            best = take(scores).topk(quota).indices if tier is None else ranked(take(scores), take(tier))[:quota]
            kept[h, best if index is None else index[best]] = True
    return kept


@dataclass
class Held:
    """The entries one row holds in one layer, per KV head, packed in original-position order. One Held may
    serve several layers (evict_row): what is derived from it is worked out once (`same` on first use)."""
    slots: torch.Tensor        # (H_kv, n) the cache slot of each entry (anything where absent)
    present: torch.Tensor      # (H_kv, n) True where the head holds an entry
    positions: torch.Tensor    # (H_kv, n) original positions (-1 where absent)
    evictable: torch.Tensor    # (H_kv, n) entries that may go
    fixed: torch.Tensor        # (H_kv, n) the entries kept whatever their score
    n_evictable: torch.Tensor  # (H_kv,)
    prefix: bool               # every head holds exactly slots 0 .. n-1 (a prefill; a cut after a uniform one)

    @functools.cached_property
    def same(self) -> bool:                  # every head holds the same positions
        return bool((self.positions == self.positions[:1]).all())


def held_entries(cache, layer: int, row: int, limit: int | None) -> Held:
    """What row `row` holds in `layer`; entries at original positions >= limit (if any) may not go, nor any of
    an exempt layer (cache.exempt). With a sliding window, what no later query can see is not held: it goes."""
    valid = cache.valid[layer][row, :, :cache.lengths[layer]]                    # (H_kv, S)
    if cache.windows[layer] is not None:
        seen = cache.positions[layer][row, :, :valid.shape[1]] > cache.next_position[row] - cache.windows[layer]
        valid = valid & seen
    count = valid.sum(-1)
    n = int(count.max())
    prefix = bool(valid[:, :n].all())                                             # every head holds slots 0 .. n-1
    if prefix:
        slots = torch.arange(n, device=valid.device).expand(valid.shape[0], n)
        positions, present = cache.positions[layer][row, :, :n], valid[:, :n]
    else:
        slots = valid.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[:, :n]
        present = torch.arange(n, device=valid.device) < count[:, None]
        positions = cache.positions[layer][row].gather(1, slots).masked_fill(~present, -1)
    evictable = present if limit is None else present & (positions < limit)
    evictable = torch.zeros_like(present) if cache.exempt[layer] else evictable
    return Held(slots, present, positions, evictable, present & ~evictable, evictable.sum(-1), prefix)


def taker(slots: torch.Tensor, repeat: int = 1):
    """A function that takes each head's entries at `slots` (heads, m) from a per-head tensor (heads x repeat,
    S, ...), `repeat` rows per head: a view of the first m slots where every head holds them there (a
    prefill), an index where all heads hold them alike, else a gather."""
    m = slots.shape[1]
    if bool((slots == torch.arange(m, device=slots.device)).all()):
        return lambda x: x[:, :m]
    if bool((slots == slots[:1]).all()):
        return lambda x: x.index_select(1, slots[0])
    slots = slots.repeat_interleave(repeat, 0)
    return lambda x: x.gather(1, slots if x.dim() == 2 else slots[..., None].expand(-1, -1, x.shape[-1]))


def policy_scores(spec: Compression, cache, layer: int, row: int, held: Held, spans: list | None,
                  n_queries: int | None, observed) -> torch.Tensor:
    """The policy's scores (H_kv, n) of what the row holds in `layer`: the one place a policy is called.

    Heads holding the same entries are scored in one call; a head holding its own (after a ragged cut)
    alone, with its own query heads. Only the newest n_queries slots (None: all) have a recorded query;
    any other is NaN, so a policy that reads one fails loudly. spans None: one span per call.
    """
    keys, values, queries = cache.keys[layer][row], cache.values[layer][row], cache.queries[layer][row]
    kv_heads, n = held.positions.shape
    group, S = queries.shape[0] // kv_heads, cache.lengths[layer]
    first = S - queries.shape[1]                                                  # the slot of the first recorded
    partial = n_queries is not None or first > 0                                  # a decode cut: the newest only
    scores = None if held.prefix and held.same else torch.full((kv_heads, n), -math.inf, device=keys.device)
    for h in [None] if held.same else range(kv_heads):                           # all heads at once, or head h
        mine = (lambda x: x) if h is None else (lambda x: x[h:h + 1])             # noqa: E731
        own_queries = queries if h is None else queries[h * group:(h + 1) * group]
        # each head's own slots, in position order (heads holding the same entries may hold them in other slots)
        slots = mine(held.slots)[:, :n if held.prefix else int(mine(held.present)[0].sum())]   # (heads, m)
        take = (lambda x: x[:, :n]) if held.prefix else taker(slots)
        q = take(own_queries) if held.prefix and not partial else \
            taker((slots - first).clamp(min=0), group)(own_queries)               # (heads * group, m, D)
        if partial:                                                               # the known ones sit at the end
            known = slots >= S - (queries.shape[1] if n_queries is None else n_queries)
            q = q.masked_fill(~known.repeat_interleave(group, 0)[..., None], math.nan)
        seen = None if observed is None else take(mine(observed[layer][row]))[None]
        context = Context(layer, cache.n_layers, seen, cache.inv_freq)
        found = POLICIES[spec.policy](q[None], take(mine(keys))[None], take(mine(values))[None],
                                      spans or [(0, slots.shape[1])], context, **spec.options)[0].float()
        if partial and torch.isnan(found).any():
            raise RuntimeError(f"{spec.policy} read a query that this protocol does not keep: "
                               "declare what it reads in decoding.DECODE")
        if held.prefix and held.same:
            return found
        mine(scores)[:, :slots.shape[1]] = found                                  # a view: writes into scores
    return scores


def evict_row(spec: Compression, budget: float, cache, row: int, ratio: float | None = None, limit: int | None = None,
              part_starts: list[int] | None = None, n_queries: int | None = None, observed=None,
              span_local: bool = True, explain: list | None = None) -> list[torch.Tensor]:
    """One row's kept slots (H_kv, S) in every layer: the one eviction pipeline, for the prefill and decode cuts.

    scores -> counts per (layer, KV head) (the allocation, from `budget` and `ratio`) -> each head's best
    of each part by tier and score. Only entries at positions below `limit` may go (None: any);
    `part_starts` are the partitions' first positions; `n_queries` the newest slots with a recorded
    query (None: all); `observed` per layer what the prefill's observer (or a replay) recorded;
    `span_local`: score each partition with its own queries (the prefill has them). `explain` gets,
    per layer, the positions, scores, tiers, counts and quotas that were ranked.
    """
    held, found = [], {}          # layers never cut nor windowed hold the same entries in the same slots: one Held
    for layer in range(cache.n_layers):
        key = layer if cache.layouts[layer] or cache.windows[layer] is not None else ("uncut", cache.exempt[layer])
        found[key] = found.get(key) or held_entries(cache, layer, row, limit)
        held.append(found[key])
    counts = torch.stack([h.n_evictable for h in held]).cpu()                    # (n_layers, H_kv) may go
    width = counts.max(1).values.tolist()                                         # evictable entries come first
    whitelist = None if not spec.whitelist else torch.tensor(sorted(set(spec.whitelist)), device=cache.device)
    if whitelist is not None and limit is not None and not all(0 <= p < limit for p in spec.whitelist):
        raise ValueError(f"whitelist positions must lie inside the system turn [0, {limit})")
    part = None
    if spec.partitions and (part_starts or [0])[1:]:
        if any(bool(h.fixed.any()) and not exempt for h, exempt in zip(held, cache.exempt)):
            raise ValueError("fair eviction scores each partition on its own, so it cannot score with a user turn")
        starts = torch.tensor(part_starts, device=cache.device)
        part = [(torch.searchsorted(starts, h.positions.contiguous(), right=True) - 1).masked_fill(~h.evictable, -1)[:, :w]
                for h, w in zip(held, width)]

    def scored(layer: int, spans) -> tuple[torch.Tensor, torch.Tensor | None]:      # scores (H_kv, n) and their tiers
        h, w = held[layer], width[layer]
        if w == 0:                                                                # nothing may go: nothing to score
            return torch.zeros(h.positions.shape[0], 0, device=cache.device), None
        scores = policy_scores(spec, cache, layer, row, h, spans, n_queries, observed)[:, :w]
        listed = None if whitelist is None else torch.isin(h.positions[:, :w], whitelist)
        return scores, tiers(scores, listed, h.evictable[:, :w])

    plain = [functools.cache(functools.partial(scored, layer, None)) for layer in range(cache.n_layers)]   # one span
    allocated = ALLOCATIONS[spec.allocation](plain, counts, budget, ratio, **spec.allocation_options)
    counts = torch.minimum(allocated.cpu(), counts)
    masks = []
    for layer, (h, w) in enumerate(zip(held, width)):
        spans = None if part is None else list(zip(part_starts, part_starts[1:] + [w]))
        local = functools.partial(scored, layer, spans) if span_local else plain[layer]
        chosen, scores, tier, quotas = choose(spec, counts[layer], plain[layer], local,
                                              None if part is None or w == 0 else part[layer])
        kept = h.fixed.clone()                                                    # (H_kv, n)
        kept[:, :w] |= chosen
        if h.prefix and kept.shape[1] == cache.lengths[layer]:                    # slots 0 .. S-1: the mask itself
            masks.append(kept)
        else:
            masks.append(torch.zeros_like(cache.valid[layer][row, :, :cache.lengths[layer]]).scatter_(1, h.slots, kept))
        if explain is not None:
            explain.append(dict(layer=layer, positions=h.positions[:, :w], scores=scores, tier=tier,
                                counts=counts[layer], quotas=quotas, kept=chosen))
    return masks


def choose(spec: Compression, count: torch.Tensor, plain, local, part: torch.Tensor | None):
    """One layer's kept mask (H_kv, w) over its evictable entries, given each head's count: the plain
    scores' best, or with partitions each part's share (proportional to what the head holds of it;
    debias blends that with the plain split) filled by `local` scores. Also returns what it ranked:
    scores, tiers and the quotas per (head, part)."""
    quotas = count[:, None]                                                       # (H_kv, parts)
    if part is None or spec.debias == 0:
        scores, tier = plain()
        return keep_best(scores, tier, None, quotas), scores, tier, quotas
    n_parts = int(part.max()) + 1
    in_part = lambda kept: torch.stack([(kept & (part.cpu() == j)).sum(-1) for j in range(n_parts)], -1)  # noqa
    quotas = proportional(in_part(part.cpu() >= 0), quotas)
    if spec.debias < 1:
        plain_counts = in_part(keep_best(*plain(), None, count[:, None]).cpu())
        quotas = proportional((1 - spec.debias) * plain_counts + spec.debias * quotas, count[:, None])
    scores, tier = local()
    return keep_best(scores, tier, part, quotas), scores, tier, quotas


# ----------------------------------------------------------------------------- the paper's protocol

class Observer:
    """A policy's attention for the system prefill (OBSERVERS), in place of flash attention; keeps its record
    per layer (H2O: what each key receives)."""

    def __init__(self, attend):
        self.attend, self.records, self.scratch = attend, {}, {}

    def __call__(self, layer: int, x, q, keys, values, mask):
        if keys.shape[2] != q.shape[2]:
            raise RuntimeError("the prefill's observer needs the system prefill to start an empty cache")
        output, self.records[layer] = self.attend(q, keys, values, mask, scratch=self.scratch)
        return output


def observer_for(specs: list[Compression]) -> Observer | None:
    """The attention a system prefill should run so that these specs' policies can read it, or None."""
    wanted = {spec.policy for spec in specs if spec.reads_observed()}
    if len(wanted) > 1:
        raise ValueError(f"one prefill can observe for one policy, not {sorted(wanted)}: batch them apart")
    return Observer(OBSERVERS[wanted.pop()]) if wanted else None


@torch.no_grad()
def prefill(model, cache, tokens: torch.Tensor, spec: Compression | list[Compression],
            real: torch.Tensor | None = None, replay: "Replay | list[Replay] | None" = None,
            explain: bool = False) -> "Compressed":
    """The paper's protocol: run the system turn (B, T) into an empty cache, recording what the policies read
    (the queries; H2O's observer; KVzip's replay, which `replay` describes: tokenizer.replay makes one),
    then compress it once, in every layer."""
    specs = spec if isinstance(spec, list) else [spec] * tokens.shape[0]
    real = torch.ones_like(tokens, dtype=torch.bool) if real is None else real
    cache.record_queries()
    observer = observer_for(specs)
    model(tokens, cache, real, attention=observer)
    observed = None if observer is None else observer.records
    if any(s.policy in REPLAYS and s.ratio > 0 for s in specs):
        if replay is None:
            raise ValueError("kvzip replays the system turn: pass replay=tokenizer.replay(system) to prefill")
        turns = [row[keep].tolist() for row, keep in zip(tokens, real)]
        observed = replay_turns(model, cache, turns, specs, replay if isinstance(replay, list) else [replay] * len(turns))
    return compress(cache, specs, observed=observed, explain=explain)


@dataclass
class Replay:
    """How KVzip has the model repeat one row's turn (kvpress 0.5.5's prompts): its tokens from `start` (after
    the header), in chunks, each after `prompt` (later ones: `later_prompt` + the previous chunk's last 8
    tokens) and the template's `suffix` (end of a user turn, the assistant's header)."""
    start: int
    prompt: list[int]             # "\n\nRepeat the previous context exactly."
    later_prompt: list[int]       # "\n\nRepeat the part of the previous context exactly, starting with"
    suffix: list[int]

    def chunks(self, turn: list[int], size: int) -> list[tuple[int, int, list[int]]]:
        """(first, end, tokens) of each replay pass: the turn's positions [first, end) repeated after the prompt."""
        out = []
        for first in range(self.start, len(turn), size):
            prompt = self.prompt if first == self.start else self.later_prompt + turn[first - min(8, size):first]
            out.append((first, min(first + size, len(turn)), prompt + self.suffix + turn[first:first + size]))
        return out


@torch.no_grad()
def replay_turns(model, cache, turns: list[list[int]], specs: list[Compression], replays: list[Replay]) -> list:
    """Each row's turn replayed after it, one chunk per pass (batched, right-padded); the cache returns to its
    state after every pass, bit for bit. Returns per layer what ReplayAttention recorded (B, H_kv, S)."""
    settings = [{**option_defaults(POLICIES[s.policy]), **s.options} for s in specs]
    chunks = [r.chunks(turn, o["chunk_size"]) if s.policy in REPLAYS else []
              for r, turn, s, o in zip(replays, turns, specs, settings)]
    attention = ReplayAttention(model, cache, settings)
    saved = cache.checkpoint()
    for index in range(max(map(len, chunks))):
        rows = [c[index] if index < len(c) else (0, 0, []) for c in chunks]       # a row done: all padding
        attention.rows = [(first, end, len(ids)) if ids else None for first, end, ids in rows]
        tokens, real = pad([ids for _, _, ids in rows], cache.device)
        model(tokens, cache, real, attention=attention)
        cache.restore(saved)
    return attention.scores


class ReplayAttention:
    """The attention hook of KVzip's replay: per layer, the most attention each replayed key receives from the
    replay's queries over the sinks, the chunk and the replay (causal; the softmax over those keys only, as
    kvpress's), in query blocks of 256. KVzip+: / ||x|| per query, x ||W_O v|| per key. Only looks (None)."""

    def __init__(self, model, cache, settings: list[dict]):
        self.settings, self.rows = settings, []
        self.o_proj = [layer.self_attn.o_proj.weight for layer in model.layers]
        self.scores = [torch.zeros(cache.batch_size, cache.kv_heads, cache.lengths[0], device=cache.device)
                       for _ in range(cache.n_layers)]

    def __call__(self, layer: int, x, q, keys, values, mask):
        S, (kv_heads, D) = keys.shape[2] - q.shape[2], keys.shape[1::2]          # the replay's keys come last
        group = q.shape[1] // kv_heads
        for b, row in enumerate(self.rows):
            if row is None:
                continue
            (first, end, n), n_sink, plus = row, self.settings[b]["n_sink"], self.settings[b]["plus"]
            sink = min(n_sink, first)
            columns = [*range(sink), *range(first, end), *range(S, S + n)]
            k, v = keys[b][:, columns].float(), values[b][:, columns].float()   # (H_kv, c, D)
            if plus:                                                              # ||W_O v|| per query head and key
                o = self.o_proj[layer].float().view(-1, kv_heads, group, D)       # (dim, H_kv, group, D)
                written = torch.cat([torch.einsum("jhgi,hti->hgtj", o, v[:, i:i + 256]).norm(dim=-1)
                                     for i in range(0, v.shape[1], 256)], -1)     # (H_kv, group, c)
            best = torch.zeros(kv_heads, end - first, device=q.device)
            for start in range(0, n, 256):
                stop = min(start + 256, n)
                rows_q = q[b, :, start:stop].float().view(kv_heads, group, stop - start, D)
                logits = rows_q @ k.transpose(1, 2)[:, None] / math.sqrt(D)      # (H_kv, group, block, c)
                future = torch.arange(n, device=q.device)[None] > torch.arange(start, stop, device=q.device)[:, None]
                logits[..., -n:].masked_fill_(future, -math.inf)
                probs = logits.softmax(-1)
                if plus:
                    probs = probs / x[b, start:stop].float().norm(dim=-1)[:, None] * written[:, :, None]
                best = torch.maximum(best, probs[..., sink:sink + end - first].amax(dim=(1, 2)))
            self.scores[layer][b, :, first:end] = best
        return None


@torch.no_grad()
def compress(cache, spec: Compression | list[Compression], system_len: list[int] | None = None,
             observed: dict | None = None, explain: bool = False) -> "Compressed":
    """Evict entries of the system turn, once, right after its recorded prefill (one spec, or one per row).

    Query-aware compression passes `system_len`: the cache holds each row's system turn, then a user
    turn; the policy scores both with all their queries, and only the system turn's entries may go.
    """
    specs = spec if isinstance(spec, list) else [spec] * cache.batch_size
    if len(specs) != cache.batch_size:
        raise ValueError(f"compress got {len(specs)} specs for a batch of {cache.batch_size}")
    if cache.queries is None or any(q is None for q in cache.queries):
        raise RuntimeError("compress() needs the system turn's prefill recorded: run policies.prefill, or the "
                           "prefill after cache.record_queries()")
    S = cache.lengths[0]
    valid = cache.valid[0][:, 0, :S]                                  # (B, S), the prefill's: same everywhere
    front = lambda n: torch.arange(S, device=cache.device)[None] < torch.as_tensor(n, device=cache.device)[:, None]
    if set(cache.lengths) != {S} or any(q.shape[2] != S for q in cache.queries):
        raise RuntimeError("compress() expects every layer to hold the prefill whose queries it recorded")
    if system_len is None and not torch.equal(valid, front(valid.sum(1))):
        raise RuntimeError("compress() expects the cache to hold one right-padded system prefill per row")
    if system_len is not None and (len(system_len) != cache.batch_size
                                   or not torch.equal(valid & front(system_len), front(system_len))):
        raise RuntimeError("compress(system_len=...) expects each row's system turn in its first slots")
    lengths = valid.sum(1).tolist() if system_len is None else list(system_len)
    if system_len is not None and any(s.policy in REPLAYS and s.ratio > 0 for s in specs):
        raise ValueError("kvzip replays the system turn alone: with a user turn (query-aware) it is not defined yet")
    explained = [[] if explain else None for _ in specs]
    rows = []
    for b, (s, L) in enumerate(zip(specs, lengths)):
        if s.n_kept(L) >= L:
            rows.append([cache.valid[layer][b, :, :S].clone() for layer in range(cache.n_layers)])
            continue
        starts = [start for start, _ in covering_spans(s.partitions, L)] if s.partitions else None
        rows.append(evict_row(s, L * (1 - s.ratio), cache, b, s.ratio, limit=L, part_starts=starts, observed=observed,
                              explain=explained[b]))
    kept = [torch.stack([masks[layer] for masks in rows]) for layer in range(cache.n_layers)]   # (B, H_kv, S) each
    for layer, mask in enumerate(kept):
        cache.keep(layer, mask)
    cache.stop_recording()
    return Compressed(kept, lengths, [report(kept, b, s, L, cache) for b, (s, L) in enumerate(zip(specs, lengths))],
                      explained if explain else None)


def report(kept: list[torch.Tensor], row: int, spec: Compression, L: int, cache) -> dict:
    """L, n_kept, what each (layer, KV head) kept of the system turn (mean, min, max), the bytes its entries
    take, and with a whitelist the share of it kept."""
    counts = torch.stack([k[row, :, :L].sum(-1) for k in kept]).float()          # (layers, H_kv)
    entry_bytes = 2 * cache.kv_heads * cache.head_dim * cache.keys[0].element_size()
    out = {"system_len": L, "n_kept": spec.n_kept(L), "kept_mean": float(counts.mean()),
           "kept_min": int(counts.min()), "kept_max": int(counts.max()),
           "effective_ratio": 1 - float(counts.mean()) / L,
           "kv_bytes": int(counts.max(1).values.sum()) * entry_bytes}             # each layer sized by its largest head
    if spec.whitelist:
        listed = torch.tensor(sorted(set(spec.whitelist)), device=kept[0].device)
        whitelisted = torch.stack([k[row][:, listed] for k in kept])             # (layers, H_kv, |W|)
        out["whitelist_len"] = len(listed)
        out["whitelist_kept"] = float(whitelisted.float().mean())                # 1.0 = every entry everywhere
    return out


@dataclass
class Compressed:
    """What compress() did: per layer the kept mask (B, H_kv, S) over the prefill's slots, each row's system
    turn length and report, and on request what each (row, layer) ranked."""
    kept: list[torch.Tensor]
    system_len: list[int]
    reports: list[dict]
    explained: list[list[dict]] | None = None

    def keep_rate(self, row: int = 0) -> torch.Tensor:
        """Per system-turn position: the fraction of KV heads that kept it, averaged over layers. (L,)"""
        L = self.system_len[row]
        return torch.stack([k[row, :, :L].float().mean(0) for k in self.kept]).mean(0)
