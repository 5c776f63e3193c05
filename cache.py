"""The KV cache: per-layer key/value buffers that the model writes into, and the compress step.

Layout (gpt-fast style): for every layer, keys and values of shape (B, H_kv, capacity, D),
filled up to that layer's `lengths[layer]` slots, and `valid` (B, H_kv, capacity): which
slots hold an entry. After compression every layer may hold a different number of entries,
and every KV head of a layer a different number (AdaKV, PyramidKV): a layer's buffers are
sized by its largest head, and a head that keeps fewer entries, or a row that has less to
store (padding, a shorter system turn), has *holes*: invalid slots that no query attends to.
Each row also tracks the original position of its next token (`next_pos`), which is what
RoPE sees: after compression decoding continues at positions L, L+1, ... although fewer
entries remain.

The paper's protocol (docs/method.md), in calls a reader can follow:

    cache = model.new_cache()
    cache.prepare([spec])                # the next forward is the system turn's prefill
    model(system_ids, cache)             # every layer hands its q, k, v to `update`
    cache.compress([spec])               # policies.py chooses, we gather
    saved = cache.checkpoint()
    ... generate an answer to one user turn ...
    cache.restore(saved)                 # back to the compressed system turn
"""
from __future__ import annotations

import torch

from policies import Compression, Layer, prefill_observer, select_kept

HEADROOM = 64          # slots a layer gets beyond its entries after compress, for the answer


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, kv_heads: int, head_dim: int,
                 capacity: int = 256, dtype=torch.float32, device="cpu", inv_freq: torch.Tensor | None = None):
        self.n_layers, self.batch_size, self.kv_heads, self.head_dim = n_layers, batch_size, kv_heads, head_dim
        self.inv_freq = inv_freq         # the model's RoPE frequencies, for policies that undo RoPE
        self.dtype, self.device = dtype, torch.device(device)
        shape = (batch_size, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]    # post-RoPE
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = [torch.zeros(shape[:3], dtype=torch.bool, device=device) for _ in range(n_layers)]
        self.lengths = [0] * n_layers                                     # slots in use, per layer
        # layers with the same layout hold the same valid slots (the kept counts per row and head,
        # packed at the front), so one attention mask serves them all
        self.layouts: list[tuple] = [()] * n_layers
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) next original position
        self.record_queries = False      # set by prepare(): keep each layer's queries for the policy
        self.queries: list[torch.Tensor | None] = [None] * n_layers      # (B, H, L, D) while recording
        self.observer = None             # set by prepare(): the attention a policy reads (policies.OBSERVERS)
        self.observed: list[torch.Tensor | None] = [None] * n_layers     # what it recorded, per layer
        self.scratch: dict = {}          # the observer's work buffers, lent from layer to layer
        self.kept: list[torch.Tensor] = []    # after compress: per layer (B, H_kv, L) bool, True = kept
        self.system_len: torch.Tensor | None = None                      # (B,) L of each row, after compress
        self._real, self._padded, self._masks = None, False, {}

    def nbytes(self) -> int:
        """Bytes of the key and value buffers held now (every layer, headroom included)."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    # ------------------------------------------------------------------ writing

    def prepare(self, specs: list[Compression]):
        """Before the system turn's prefill: record what compress(specs) will need.

        Every layer's queries, and, when a policy reads the prefill's attention (H2O), that
        policy's observer runs instead of flash attention and its record is kept per layer.
        """
        self.record_queries, self.queries = True, [None] * self.n_layers
        self.observer = prefill_observer(specs)

    def begin(self, real: torch.Tensor) -> torch.Tensor:
        """Start a chunk of tokens; `real` (B, T) is False for padding. Returns their positions (B, T)."""
        positions = (self.next_pos[:, None] + real.long().cumsum(1) - 1).clamp(min=0)   # (B, T)
        self.next_pos += real.sum(1)
        self._real, self._padded, self._masks = real, not bool(real.all()), {}
        return positions

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write this chunk's keys/values (B, H_kv, T, D) for `layer`.

        Returns every key and value of the layer (B, H_kv, S, D) and the attention mask: None
        when plain causal attention is exact, else (B, 1, T, S), or (B, H_kv, T, S) when the
        layer's KV heads hold different entries.
        """
        T = k.shape[2]
        start, end = self.lengths[layer], self.lengths[layer] + T
        if end > self.keys[layer].shape[2]:
            self._resize(layer, max(end, 2 * self.keys[layer].shape[2]))
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.valid[layer][:, :, start:end] = self._real[:, None, :]
        self.lengths[layer] = end
        if self.record_queries:                                           # (B, H, end, D), post-RoPE, every chunk's
            self.queries[layer] = q if self.queries[layer] is None else torch.cat([self.queries[layer], q], 2)
        if self.observer is not None and start != 0:
            raise RuntimeError("the prefill's observer needs the system prefill to start an empty cache")
        layout = self.layouts[layer]
        if layout not in self._masks:
            self._masks[layout] = self._mask(self.valid[layer][:, :, :end], start)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], self._masks[layout]

    def observe(self, layer: int, q, keys, values, mask) -> torch.Tensor:
        """The system prefill's attention, by the policy's observer; what it records is kept for compress()."""
        y, self.observed[layer] = self.observer(q, keys, values, mask, scratch=self.scratch)
        return y

    def _mask(self, valid: torch.Tensor, start: int) -> torch.Tensor | None:
        """Attention mask for a chunk written at slot `start` of a layer with these valid slots (B, H_kv, S).

        A real query sees the valid slots up to its own, a padding query only its own slot
        (never an empty row, and padding pays no attention to real keys). None when there are
        no holes and plain causal attention is exact: a one-token step sees every slot, and a
        chunk that starts at slot 0 (T == S) sees the causal triangle, which attention then
        computes without a mask, skipping the masked half.
        """
        real = self._real
        T, S = real.shape[1], valid.shape[2]
        if (T == 1 or start == 0) and bool(valid.all()):
            return None
        if bool((valid == valid[:, :1]).all()):
            valid = valid[:, :1]                                          # every head holds the same slots
        if T == 1 and not self._padded:                                   # a decoding step sees every valid slot
            return valid[:, :, None, :]                                   # (B, 1 or H_kv, 1, S)
        slots = torch.arange(S, device=self.device)
        own = start + torch.arange(T, device=self.device)
        causal = slots[None, :] <= own[:, None]                           # (T, S)
        own_slot = slots[None, :] == own[:, None]                         # (T, S)
        visible = (valid[:, :, None, :] & real[:, None, :, None]) | own_slot           # (B, 1 or H_kv, T, S)
        return causal & visible

    def _resize(self, layer: int, capacity: int):
        keep = min(self.lengths[layer], capacity)
        def moved(buf):
            new = buf.new_zeros(*buf.shape[:2], capacity, *buf.shape[3:])
            new[:, :, :keep] = buf[:, :, :keep]
            return new
        self.keys[layer], self.values[layer] = moved(self.keys[layer]), moved(self.values[layer])
        self.valid[layer] = moved(self.valid[layer])

    # ------------------------------------------------------------------ compression

    @torch.no_grad()
    def compress(self, spec: Compression | list[Compression], system_len: list[int] | None = None) -> list[dict]:
        """Evict entries of the system turn, once, right after its prefill (docs/method.md).

        `spec` is one Compression for every row or a list with one per row. In every layer
        and for every row, policies.select_kept turns the policy's scores and the allocation's
        counts into the kept positions per KV head; we gather those entries, in position
        order, into buffers sized by the layer's largest head.

        Query-aware compression passes `system_len` (one per row): the cache then holds the
        system turn's prefill followed by a user turn's, each right-padded, both recorded since
        prepare(). The policy scores the row's entries with the queries of both; only the first
        system_len[b] are evictable, with the system turn's budget; the user turn's are all kept.
        Returns one report per row: L (the system turn's), the budget n_kept, what was kept per
        (layer, KV head) of the system turn (mean, min, max), the bytes its entries take, and,
        with a whitelist, how much stayed.
        """
        specs = spec if isinstance(spec, list) else [spec] * self.batch_size
        if len(specs) != self.batch_size:
            raise ValueError(f"compress got {len(specs)} specs for a batch of {self.batch_size}")
        if not self.record_queries or any(q is None for q in self.queries):
            raise RuntimeError("compress() needs the system turn's prefill, run after cache.prepare(specs)")
        S = self.lengths[0]
        valid = self.valid[0][:, 0, :S]                                   # (B, S), the prefill's: same everywhere
        front = lambda n: torch.arange(S, device=self.device)[None] < torch.as_tensor(n, device=self.device)[:, None]
        if set(self.lengths) != {S} or any(q.shape[2] != S for q in self.queries):
            raise RuntimeError("compress() expects every layer to hold the prefill whose queries it recorded")
        if system_len is None:                                            # the paper's protocol: the system turn alone
            if not torch.equal(valid, front(valid.sum(1))):
                raise RuntimeError("compress() expects the cache to hold one right-padded system prefill per row")
            lengths = valid.sum(1).tolist()
            slots = [slice(0, L) for L in lengths]
        else:                                                             # query-aware: system turn, then user turn
            if len(system_len) != self.batch_size or not torch.equal(valid & front(system_len), front(system_len)):
                raise RuntimeError("compress(system_len=...) expects each row's system turn in its first slots")
            lengths = list(system_len)
            slots = [valid[b].nonzero()[:, 0] for b in range(self.batch_size)]   # (system + user,) per row
        states = [{} for _ in specs]                                      # a policy's state, per row, across layers
        self.kept = []
        for layer in range(self.n_layers):
            kept = torch.zeros(self.batch_size, self.kv_heads, S, dtype=torch.bool, device=self.device)
            for b, (s, L, index) in enumerate(zip(specs, lengths, slots)):
                row = slice(b, b + 1)
                observed = self.observed[layer]
                where = Layer(layer, self.n_layers, states[b], None if observed is None else observed[row, :, index],
                              self.inv_freq)
                kept[b, :, index] = select_kept(s, self.queries[layer][row, :, index], self.keys[layer][row, :, index],
                                                self.values[layer][row, :, index], where,
                                                None if system_len is None else L)   # (H_kv, L or system + user)
            self._gather(layer, kept)
            self.kept.append(kept)
        self.queries, self.observed, self.scratch = [None] * self.n_layers, [None] * self.n_layers, {}
        self.record_queries, self.observer = False, None
        self.system_len = torch.tensor(lengths, device=self.device)     # (B,) the system turn's L per row
        return [self._report(b, s, L) for b, (s, L) in enumerate(zip(specs, lengths))]

    def _gather(self, layer: int, kept: torch.Tensor):
        """Keep the entries marked in kept (B, H_kv, S), packed in position order at the front of new buffers."""
        counts = kept.sum(-1)                                             # (B, H_kv)
        n = int(counts.max())
        index = kept.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :n]   # (B, H_kv, n) kept first
        gather = index[..., None].expand(-1, -1, -1, self.head_dim)       # (B, H_kv, n, D)
        for buffers in (self.keys, self.values):
            new = buffers[layer].new_zeros(self.batch_size, self.kv_heads, n + HEADROOM, self.head_dim)
            new[:, :, :n] = buffers[layer].gather(2, gather)
            buffers[layer] = new                                          # memory really shrinks
        slots = torch.arange(n + HEADROOM, device=self.device)
        self.valid[layer] = slots < counts[..., None]                     # (B, H_kv, n + HEADROOM)
        self.lengths[layer] = n
        self.layouts[layer] = tuple(counts.flatten().tolist())

    def _report(self, row: int, spec: Compression, L: int) -> dict:
        counts = torch.stack([k[row, :, :L].sum(-1) for k in self.kept]).float()    # (layers, H_kv)
        entry_bytes = 2 * self.kv_heads * self.head_dim * self.keys[0].element_size()
        report = {"system_len": L, "n_kept": spec.budget(L), "kept_mean": float(counts.mean()),
                  "kept_min": int(counts.min()), "kept_max": int(counts.max()),
                  "effective_ratio": 1 - float(counts.mean()) / L,
                  "kv_bytes": int(counts.max(1).values.sum()) * entry_bytes}   # each layer sized by its largest head
        if spec.whitelist:
            listed = torch.tensor(sorted(set(spec.whitelist)), device=self.device)
            kept = torch.stack([k[row][:, listed] for k in self.kept])   # (layers, H_kv, |W|)
            report["whitelist_len"] = len(listed)
            report["whitelist_kept"] = float(kept.float().mean())          # 1.0 = every entry everywhere
        return report

    def keep_rate(self, row: int = 0) -> torch.Tensor:
        """Per system-turn position: the fraction of KV heads that kept it, averaged over layers. (L,)"""
        if not self.kept:
            raise RuntimeError("keep_rate() needs a compressed cache")
        L = int(self.system_len[row])
        return torch.stack([k[row, :, :L].float().mean(0) for k in self.kept]).mean(0)

    # ------------------------------------------------------------------ reuse

    def select_rows(self, index: torch.Tensor):
        """Keep only these batch rows, in this order (generation drops the rows that finished)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.valid = [v.index_select(0, index) for v in self.valid]
        self.next_pos = self.next_pos.index_select(0, index)
        self.kept = [k.index_select(0, index) for k in self.kept]
        self.system_len = None if self.system_len is None else self.system_len.index_select(0, index)
        self.batch_size = len(index)

    def checkpoint(self) -> dict:
        """A copy of the cache's state (e.g. the compressed system turn) to come back to with restore()."""
        n = self.lengths
        return dict(lengths=list(n), layouts=list(self.layouts),
                    keys=[k[:, :, :m].clone() for k, m in zip(self.keys, n)],
                    values=[v[:, :, :m].clone() for v, m in zip(self.values, n)],
                    valid=[v[:, :, :m].clone() for v, m in zip(self.valid, n)],
                    next_pos=self.next_pos.clone(), kept=self.kept, system_len=self.system_len,
                    queries=list(self.queries) if self.record_queries else None)   # a prefill still to compress

    def restore(self, state: dict):
        """Return to a checkpoint: its rows, entries and positions, bit for bit; later writes are dropped."""
        rows = state["next_pos"].shape[0]
        for layer, n in enumerate(state["lengths"]):
            if rows != self.batch_size or self.keys[layer].shape[2] < n:
                shape = (rows, self.kv_heads, n + HEADROOM, self.head_dim)
                self.keys[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)
                self.values[layer] = torch.zeros_like(self.keys[layer])
                self.valid[layer] = torch.zeros(shape[:3], dtype=torch.bool, device=self.device)
            self.keys[layer][:, :, :n] = state["keys"][layer]
            self.values[layer][:, :, :n] = state["values"][layer]
            self.valid[layer].zero_()
            self.valid[layer][:, :, :n] = state["valid"][layer]
        self.batch_size = rows
        self.lengths, self.layouts = list(state["lengths"]), list(state["layouts"])
        self.next_pos = state["next_pos"].clone()
        self.kept, self.system_len = state["kept"], state["system_len"]
        self.record_queries = state["queries"] is not None
        self.queries = list(state["queries"]) if self.record_queries else [None] * self.n_layers
