"""The KV cache: per-layer key/value buffers that the model writes into, and the compress step.

Layout (gpt-fast style): for every layer, keys and values of shape (B, H_kv, capacity, D),
filled up to `length` slots. All rows of a batch share the slot counter; a row that has
less to store (padding, or a smaller compressed system turn) has *holes*: slots marked
invalid in `valid` (B, capacity) that no query attends to. Each row also tracks the
original position of its next token (`next_pos`), which is what RoPE sees: after
compression decoding continues at positions L, L+1, ... although fewer entries remain.

The paper's protocol (docs/method.md), in calls a reader can follow:

    cache = model.new_cache()
    cache.record_queries = True          # the next forward is the system turn's prefill
    cache.record_received = True         # (H2O only) it also sums the attention each key receives
    model(system_ids, cache)             # every layer hands its q, k, v to `update`
    cache.compress(Compression("snapkv", ratio=0.5))   # policies.py chooses, we gather
    saved = cache.checkpoint()
    ... generate an answer to one user turn ...
    cache.restore(saved)                 # back to the compressed system turn
"""
from __future__ import annotations

import torch

from policies import Compression, select_kept


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, kv_heads: int, head_dim: int,
                 capacity: int = 256, dtype=torch.float32, device="cpu"):
        self.n_layers, self.batch_size, self.kv_heads, self.head_dim = n_layers, batch_size, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        shape = (batch_size, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]    # post-RoPE
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)        # (B, capacity)
        self.length = 0                                                  # slots in use, shared by all rows
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) next original position
        self.record_queries = False      # set before the system prefill: keep each layer's queries for the policy
        self.queries: list[torch.Tensor | None] = [None] * n_layers      # (B, H, L, D) while recording
        self.record_received = False     # also sum the attention each key receives (what H2O reads), see
        self.received: list[torch.Tensor | None] = [None] * n_layers     # model.attention_with_received; (B, H_kv, L)
        self.scratch: dict = {}          # its work buffers, lent from layer to layer during that prefill
        self.kept: list[torch.Tensor] = []    # after compress: per layer (B, H_kv, L) bool, True = kept
        self.system_len: torch.Tensor | None = None                      # (B,) L of each row, after compress
        self._write_start = 0

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    # ------------------------------------------------------------------ writing

    def begin(self, real: torch.Tensor):
        """Reserve slots for a chunk of tokens; return their positions (B, T) and the attention mask.

        `real` (B, T) is False for padding. The mask (B, 1, T, S) lets a real query see the
        valid slots up to its own, and a padding query only its own slot (never an empty row,
        and padding pays no attention to real keys).
        It is None when there are no holes and plain causal attention is exact: a one-token
        step sees every slot, and a chunk that starts at slot 0 (T == S) sees the causal
        triangle, which attention then computes without a mask, skipping the masked half.
        """
        B, T = real.shape
        self._reserve(self.length + T)
        start, self._write_start = self.length, self.length
        positions = (self.next_pos[:, None] + real.long().cumsum(1) - 1).clamp(min=0)   # (B, T)
        self.next_pos += real.sum(1)
        self.valid[:, start:start + T] = real
        self.length = start + T
        if (T == 1 or start == 0) and bool(self.valid[:, :self.length].all()):
            return positions, None
        slots = torch.arange(self.length, device=self.device)
        own = start + torch.arange(T, device=self.device)
        causal = slots[None, :] <= own[:, None]                           # (T, S)
        own_slot = slots[None, None, :] == own[None, :, None]                             # (1, T, S)
        visible = (self.valid[:, None, :self.length] & real[:, :, None]) | own_slot       # (B, T, S)
        return positions, (causal[None] & visible)[:, None]

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write this chunk's keys/values (B, H_kv, T, D) for `layer`; return all (B, H_kv, S, D)."""
        start, end = self._write_start, self.length
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        if self.record_queries:
            self.queries[layer] = q                                       # (B, H, T, D), post-RoPE
        if self.record_received and start != 0:
            raise RuntimeError("record_received needs the system prefill to start an empty cache")
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _reserve(self, needed: int):
        if needed > self.capacity:
            self._resize(max(needed, 2 * self.capacity))

    def _resize(self, capacity: int):
        keep = min(self.length, capacity)
        def moved(buf):
            new = torch.zeros(*buf.shape[:2], capacity, buf.shape[3], dtype=buf.dtype, device=buf.device)
            new[:, :, :keep] = buf[:, :, :keep]
            return new
        self.keys = [moved(k) for k in self.keys]
        self.values = [moved(v) for v in self.values]
        valid = torch.zeros(self.batch_size, capacity, dtype=torch.bool, device=self.device)
        valid[:, :keep] = self.valid[:, :keep]
        self.valid = valid

    # ------------------------------------------------------------------ compression

    @torch.no_grad()
    def compress(self, spec: Compression | list[Compression]) -> list[dict]:
        """Evict entries of the system turn, once, right after its prefill (docs/method.md).

        `spec` is one Compression for every row or a list with one per row. In every layer
        and for every row, policies.select_kept turns the policy's scores into the kept
        positions per KV head (sorted); we gather those entries into a smaller cache.
        Returns one report per row: L, n_kept and, with a whitelist, how much of it stayed.
        """
        specs = spec if isinstance(spec, list) else [spec] * self.batch_size
        if len(specs) != self.batch_size:
            raise ValueError(f"compress got {len(specs)} specs for a batch of {self.batch_size}")
        if not self.record_queries or any(q is None for q in self.queries):
            raise RuntimeError("compress() needs the system turn's prefill, run with cache.record_queries = True")
        valid = self.valid[:, :self.length]
        system_len = valid.sum(1)                                         # (B,) L per row
        if not torch.equal(valid, torch.arange(self.length, device=self.device)[None] < system_len[:, None]):
            raise RuntimeError("compress() expects the cache to hold one right-padded system prefill per row")
        lengths = system_len.tolist()
        n_kept = [s.budget(L) for s, L in zip(specs, lengths)]
        new_length = max(n_kept)
        self.kept = []
        for layer in range(self.n_layers):
            index = torch.zeros(self.batch_size, self.kv_heads, new_length, dtype=torch.long, device=self.device)
            kept = torch.zeros(self.batch_size, self.kv_heads, self.length, dtype=torch.bool, device=self.device)
            for b, (s, L, n) in enumerate(zip(specs, lengths, n_kept)):
                row = slice(b, b + 1)
                received = self.received[layer]
                chosen = select_kept(s, self.queries[layer][row, :, :L], self.keys[layer][row, :, :L],
                                     self.values[layer][row, :, :L],
                                     None if received is None else received[row, :, :L])  # (H_kv, n) sorted
                index[b, :, :n] = chosen
                kept[b].scatter_(1, chosen, True)
            gather = index[..., None].expand(-1, -1, -1, self.head_dim)   # (B, H_kv, n_kept, D)
            self.keys[layer][:, :, :new_length] = self.keys[layer].gather(2, gather)
            self.values[layer][:, :, :new_length] = self.values[layer].gather(2, gather)
            self.kept.append(kept)
        self.valid[:, :new_length] = torch.arange(new_length, device=self.device)[None] < torch.tensor(n_kept, device=self.device)[:, None]
        self.length = new_length
        self._resize(new_length + 64)                                     # memory really shrinks
        self.queries, self.received, self.scratch = [None] * self.n_layers, [None] * self.n_layers, {}
        self.record_queries = self.record_received = False
        self.system_len = system_len
        return [self._report(b, s, L, n) for b, (s, L, n) in enumerate(zip(specs, lengths, n_kept))]

    def _report(self, row: int, spec: Compression, L: int, n_kept: int) -> dict:
        report = {"system_len": L, "n_kept": n_kept, "effective_ratio": 1 - n_kept / L}
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
        self.valid, self.next_pos = self.valid.index_select(0, index), self.next_pos.index_select(0, index)
        self.kept = [k.index_select(0, index) for k in self.kept]
        self.system_len = None if self.system_len is None else self.system_len.index_select(0, index)
        self.batch_size = len(index)

    def checkpoint(self) -> dict:
        """A copy of the cache's state (e.g. the compressed system turn) to come back to with restore()."""
        n = self.length
        return dict(length=n, keys=[k[:, :, :n].clone() for k in self.keys],
                    values=[v[:, :, :n].clone() for v in self.values], valid=self.valid[:, :n].clone(),
                    next_pos=self.next_pos.clone(), kept=self.kept, system_len=self.system_len)

    def restore(self, state: dict):
        """Return to a checkpoint: its rows, entries and positions, bit for bit; later writes are dropped."""
        n, rows = state["length"], state["valid"].shape[0]
        if rows != self.batch_size or self.capacity < n:
            self.batch_size = rows
            self.keys = [torch.zeros(rows, self.kv_heads, n + 64, self.head_dim, dtype=self.dtype, device=self.device)
                         for _ in range(self.n_layers)]
            self.values = [torch.zeros_like(k) for k in self.keys]
            self.valid = torch.zeros(rows, n + 64, dtype=torch.bool, device=self.device)
        for layer in range(self.n_layers):
            self.keys[layer][:, :, :n] = state["keys"][layer]
            self.values[layer][:, :, :n] = state["values"][layer]
        self.valid.zero_()
        self.valid[:, :n] = state["valid"]
        self.length, self.next_pos = n, state["next_pos"].clone()
        self.kept, self.system_len = state["kept"], state["system_len"]
