"""The KV cache: per-layer key/value buffers that the model writes into, and the operations on them.

For every layer (gpt-fast style), keys and values (B, H_kv, capacity, D) filled up to `lengths[layer]`
slots, and `valid` (B, H_kv, capacity). After eviction every layer and KV head may hold its own count
(AdaKV, PyramidKV): a layer's buffers are sized by its largest head, and fewer entries, or padding,
leave *holes*, invalid slots no query attends to. Each slot keeps its token's original position
(`positions`): decoding continues at L, L+1, ... however much was evicted; RoPE sees the same
positions unless keys were re-rotated (decoding.py: then `rotary` keeps them). While recording, the
cache also keeps each layer's queries, the one thing a policy reads that attention does not store.

A sliding-window layer (Mistral's; Gemma 3's local ones) lets a query at position p see only keys at
p - window < k <= p, and forgets what no later query can see, so it stays bounded by its window.
`exempt` marks the layers eviction leaves alone (Gemma 3's local layers, as kvpress). The cache knows
no policy: policies.prefill records, runs the system turn and asks it to `keep` what it chose.
"""
from __future__ import annotations

import torch

HEADROOM = 64          # slots a layer gets beyond its entries after eviction, for the answer
BUFFERS = ("keys", "values", "valid", "positions", "rotary")   # the per-slot buffers, each a list over layers


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, kv_heads: int, head_dim: int,
                 capacity: int = 256, dtype=torch.float32, device="cpu", inv_freq: torch.Tensor | None = None,
                 windows: list | None = None, exempt: list | None = None):
        self.n_layers, self.batch_size, self.kv_heads, self.head_dim = n_layers, batch_size, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.inv_freq = inv_freq         # the RoPE frequencies (D/2,) the keys were rotated with
        self.windows = list(windows or [None] * n_layers)    # per layer: its sliding window, or None
        self.exempt = list(exempt or [False] * n_layers)     # per layer: eviction keeps all it holds
        shape = (batch_size, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]    # post-RoPE
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = [torch.zeros(shape[:3], dtype=torch.bool, device=device) for _ in range(n_layers)]
        self.positions = [torch.zeros(shape[:3], dtype=torch.long, device=device) for _ in range(n_layers)]
        self.rotary: list[torch.Tensor] | None = None    # each slot's rotary position, once it differs (re-rotation)
        self.lengths = [0] * n_layers                    # slots in use, per layer
        self.layouts: list[tuple] = [()] * n_layers      # layers of one layout share their valid slots: one mask
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)   # (B,) the next token's
        self.next_rotary = torch.zeros(batch_size, dtype=torch.long, device=device)     # (B,) what RoPE gives it
        self.queries: list[torch.Tensor | None] | None = None   # while recording: per layer (B, H, n, D), post-RoPE
        self.query_limit: int | None = None                     # keep the newest n queries (None: all of them)
        self._chunk: tuple = ()          # the chunk being written: real (B, T), original and rotary positions
        self._masks: dict = {}           # the chunk's attention masks, per layout

    def nbytes(self) -> int:
        """Bytes of the key and value buffers held now (every layer, headroom included)."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def buffers(self) -> list[tuple[str, list[torch.Tensor]]]:
        """(name, per-layer list) of every per-slot buffer held: the one list that gathering, resizing,
        row selection, checkpoint and restore go through."""
        return [(name, getattr(self, name)) for name in BUFFERS if getattr(self, name) is not None]

    # ------------------------------------------------------------------ writing

    def record_queries(self, limit: int | None = None):
        """From now on keep every layer's queries: all of them, or the newest `limit` (decoding's buffer)."""
        self.queries, self.query_limit = [None] * self.n_layers, limit

    def stop_recording(self):
        self.queries, self.query_limit = None, None

    def begin(self, real: torch.Tensor) -> torch.Tensor:
        """Start a chunk of tokens; `real` (B, T) is False for padding. Returns their rotary positions (B, T)."""
        ahead = real.long().cumsum(1) - 1                                 # (B, T) real tokens before each
        original = (self.next_position[:, None] + ahead).clamp(min=0)    # (B, T)
        rotary = (self.next_rotary[:, None] + ahead).clamp(min=0)        # (B, T)
        self.next_position += real.sum(1)
        self.next_rotary += real.sum(1)
        self._chunk, self._masks = (real, original, rotary), {}
        return rotary

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write this chunk's keys/values (B, H_kv, T, D) for `layer` (and q, while recording). Returns every key
        and value of the layer (B, H_kv, S, D) and the mask: None when plain causal attention is exact, else
        (B, 1 or H_kv, T, S)."""
        real, original, rotary = self._chunk
        T, window = k.shape[2], self.windows[layer]
        # a windowed layer forgets before it outgrows window + HEADROOM, unless queries are recorded (their slots
        # must not move: compress() and decode cuts read them, and drop what no later query can see themselves)
        if window is not None and self.queries is None and \
                self.lengths[layer] + T > min(self.keys[layer].shape[2], window + HEADROOM):
            self._forget(layer, window)
        start, end = self.lengths[layer], self.lengths[layer] + T
        if end > self.keys[layer].shape[2]:
            self._resize(layer, max(end, 2 * self.keys[layer].shape[2]))
        written = {"keys": k, "values": v, "valid": real[:, None], "positions": original[:, None],
                   "rotary": rotary[:, None]}
        for name, buffers in self.buffers():
            buffers[layer][:, :, start:end] = written[name]
        self.lengths[layer] = end
        if self.queries is not None:                                      # (B, H, n, D), the newest last
            recorded = q if self.queries[layer] is None else torch.cat([self.queries[layer], q], 2)
            self.queries[layer] = recorded if self.query_limit is None else recorded[:, :, -self.query_limit:]
        key = (self.layouts[layer], window)
        if key not in self._masks:
            near = None if window is None else self._near(layer, end, window)
            self._masks[key] = self._mask(self.valid[layer][:, :, :end], start, near)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], self._masks[key]

    def _mask(self, valid: torch.Tensor, start: int, near: torch.Tensor | None = None) -> torch.Tensor | None:
        """Mask for a chunk written at slot `start` of a layer with these valid slots (B, H_kv, S) and, with a
        window, `near` (B, 1 or H_kv, T, S). A real query sees the valid slots up to its own, a padding query
        only its own slot. None when causal attention is exact (no holes: a one-token step, or a chunk that
        starts the cache, which attention then computes without a mask)."""
        real = self._chunk[0]
        T, S = real.shape[1], valid.shape[2]
        if near is not None and bool(near.all()):
            near = None
        if (T == 1 or start == 0) and near is None and bool(valid.all()):
            return None
        if bool((valid == valid[:, :1]).all()):
            valid = valid[:, :1]                                          # every head holds the same slots
        valid = valid[:, :, None, :] if near is None else valid[:, :, None, :] & near   # (B, 1 or H_kv, 1 or T, S)
        if T == 1 and bool(real.all()):                                   # a decoding step sees every valid slot
            return valid                                                  # (B, 1 or H_kv, 1, S)
        slots = torch.arange(S, device=self.device)
        own = start + torch.arange(T, device=self.device)
        causal = slots[None, :] <= own[:, None]                           # (T, S)
        own_slot = slots[None, :] == own[:, None]                         # (T, S)
        visible = (valid & real[:, None, :, None]) | own_slot             # (B, 1 or H_kv, T, S)
        return causal & visible

    def _near(self, layer: int, end: int, window: int) -> torch.Tensor:
        """(B, 1 or H_kv, T, S): the slots whose original position lies inside each query's window."""
        positions = self.positions[layer][:, :, :end]                     # (B, H_kv, S)
        if bool((positions == positions[:, :1]).all()):
            positions = positions[:, :1]
        return positions[:, :, None, :] > self._chunk[1][:, None, :, None] - window

    def _forget(self, layer: int, window: int):
        """Drop the entries of a windowed layer that no query of this chunk or later can see."""
        first = self.next_position - self._chunk[0].sum(1)                # (B,) this chunk's first position
        held = self.valid[layer][:, :, :self.lengths[layer]]
        live = held & (self.positions[layer][:, :, :held.shape[2]] > (first - window)[:, None, None])
        if not torch.equal(live, held):
            self.keep(layer, live)

    def _resize(self, layer: int, capacity: int):
        keep = min(self.lengths[layer], capacity)
        for _, buffers in self.buffers():
            new = buffers[layer].new_zeros(*buffers[layer].shape[:2], capacity, *buffers[layer].shape[3:])
            new[:, :, :keep] = buffers[layer][:, :, :keep]
            buffers[layer] = new

    # ------------------------------------------------------------------ eviction

    def keep(self, layer: int, kept: torch.Tensor, headroom: int = HEADROOM):
        """Keep the entries marked in kept (B, H_kv, S), packed in position order at the front of buffers of
        n + headroom slots (n: the largest head's count), reallocated unless they have exactly that room."""
        counts = kept.sum(-1)                                             # (B, H_kv)
        n = int(counts.max())
        index = kept.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :n]   # (B, H_kv, n) kept first
        capacity = n + headroom
        for _, buffers in self.buffers():
            old = buffers[layer]
            taken = old.gather(2, index if old.dim() == 3 else index[..., None].expand(-1, -1, -1, self.head_dim))
            if old.shape[2] != capacity:
                buffers[layer] = old.new_zeros(*old.shape[:2], capacity, *old.shape[3:])   # memory really shrinks
            buffers[layer][:, :, :n] = taken
        self.valid[layer] = torch.arange(capacity, device=self.device) < counts[..., None]   # (B, H_kv, capacity)
        self.lengths[layer] = n
        self.layouts[layer] = tuple(counts.flatten().tolist())
        if self.windows[layer] is not None:                               # its own positions: its own mask
            self.layouts[layer] += (f"layer {layer}",)

    def track_rotary(self):
        """Keep each slot's rotary position apart from its original one, from now on (re-rotation moves it)."""
        if self.rotary is None:
            self.rotary = [p.clone() for p in self.positions]

    # ------------------------------------------------------------------ reuse

    def select_rows(self, index: torch.Tensor):
        """Keep only these batch rows, in this order (generation drops the rows that finished)."""
        for _, buffers in self.buffers():
            buffers[:] = [b.index_select(0, index) for b in buffers]
        self.next_position = self.next_position.index_select(0, index)
        self.next_rotary = self.next_rotary.index_select(0, index)
        if self.queries is not None:
            self.queries = [None if q is None else q.index_select(0, index) for q in self.queries]
        self.batch_size = len(index)

    def checkpoint(self) -> dict:
        """A copy of the cache's state (e.g. the compressed system turn) to come back to with restore()."""
        state = {name: [b[:, :, :n].clone() for b, n in zip(buffers, self.lengths)] for name, buffers in self.buffers()}
        return dict(state, lengths=list(self.lengths), layouts=list(self.layouts),
                    next_position=self.next_position.clone(), next_rotary=self.next_rotary.clone(),
                    queries=None if self.queries is None else list(self.queries), query_limit=self.query_limit)

    def restore(self, state: dict):
        """Return to a checkpoint, bit for bit; buffers keep their capacity when the rows and entries fit."""
        rows = state["next_position"].shape[0]
        self.rotary = None if "rotary" not in state else self.rotary
        for name in BUFFERS:
            if name not in state:
                continue
            buffers = getattr(self, name) or [None] * self.n_layers
            for layer, n in enumerate(state["lengths"]):
                saved, held = state[name][layer], buffers[layer]
                if held is None or rows != self.batch_size or held.shape[2] < n:
                    buffers[layer] = saved.new_zeros(rows, self.kv_heads, n + HEADROOM, *saved.shape[3:])
                buffers[layer][:, :, n:] = 0
                buffers[layer][:, :, :n] = saved
            setattr(self, name, buffers)
        self.batch_size = rows
        self.lengths, self.layouts = list(state["lengths"]), list(state["layouts"])
        self.next_position, self.next_rotary = state["next_position"].clone(), state["next_rotary"].clone()
        self.queries = None if state["queries"] is None else list(state["queries"])
        self.query_limit = state["query_limit"]
