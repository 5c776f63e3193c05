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

from policies import INF, POLICIES, Compression, Decoding, Layer, decode_kept, prefill_observer, select_kept

HEADROOM = 64          # slots a layer gets beyond its entries after compress, for the answer


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, kv_heads: int, head_dim: int,
                 capacity: int = 256, dtype=torch.float32, device="cpu", inv_freq: torch.Tensor | None = None):
        self.n_layers, self.batch_size, self.kv_heads, self.head_dim = n_layers, batch_size, kv_heads, head_dim
        self.inv_freq = inv_freq         # the model's RoPE frequencies (D/2,): policies that undo RoPE, re-rotation
        self.dtype, self.device = dtype, torch.device(device)
        shape = (batch_size, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]    # post-RoPE
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = [torch.zeros(shape[:3], dtype=torch.bool, device=device) for _ in range(n_layers)]
        # the original position of every slot (the token's index in the sequence), whatever RoPE saw
        self.positions = [torch.zeros(shape[:3], dtype=torch.long, device=device) for _ in range(n_layers)]
        self.rotary: list[torch.Tensor] | None = None    # the rotary position of every slot, once re-rotation differs
        self.lengths = [0] * n_layers                                     # slots in use, per layer
        # layers with the same layout hold the same valid slots (the kept counts per row and head,
        # packed at the front), so one attention mask serves them all
        self.layouts: list[tuple] = [()] * n_layers
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) next token's rotary position
        self.next_index = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) its original position
        self.record_queries = False      # set by prepare(): keep each layer's queries for the policy
        self.queries: list[torch.Tensor | None] = [None] * n_layers      # (B, H, L, D) while recording
        self.observer = None             # set by prepare(): the attention a policy reads (policies.OBSERVERS)
        self.observed: list[torch.Tensor | None] = [None] * n_layers     # what it recorded, per layer
        self.scratch: dict = {}          # the observer's work buffers, lent from layer to layer
        self.kept: list[torch.Tensor] = []    # after compress: per layer (B, H_kv, L) bool, True = kept
        self.system_len: torch.Tensor | None = None                      # (B,) L of each row, after compress
        self._real, self._padded, self._masks = None, False, {}
        # compression during decoding (start_decoding): one Decoding per row, or None
        self.decoding: list[Decoding] | None = None
        self.steps = torch.zeros(n_layers, batch_size, dtype=torch.long)  # decode forwards since the last cut
        self.recent_queries: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]   # (B, H, 1, D) each
        self.generated_from = torch.zeros(batch_size, dtype=torch.long)   # (B,) original position of the answer
        self.row_ids = list(range(batch_size))     # the generation's original row of each live row
        self.log_cuts, self.cut_log = False, []    # set log_cuts: one dict per decode cut (docs/method.md)

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
        ahead = real.long().cumsum(1) - 1                                 # (B, T) real tokens before each
        positions = (self.next_pos[:, None] + ahead).clamp(min=0)         # (B, T) rotary
        self._original = (self.next_index[:, None] + ahead).clamp(min=0)  # (B, T)
        self._rotary = positions
        self.next_pos += real.sum(1)
        self.next_index += real.sum(1)
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
        self.positions[layer][:, :, start:end] = self._original[:, None, :]
        if self.rotary is not None:
            self.rotary[layer][:, :, start:end] = self._rotary[:, None, :]
        self.lengths[layer] = end
        if self.record_queries:                                           # (B, H, end, D), post-RoPE, every chunk's
            self.queries[layer] = q if self.queries[layer] is None else torch.cat([self.queries[layer], q], 2)
        if self.decoding is not None:                                     # a decode forward: count it, keep its query
            self.steps[layer] += 1
            self.recent_queries[layer] = (self.recent_queries[layer] + [q])[-self._buffer:]
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

    def _buffers(self):
        """Every per-slot buffer list: keys, values, valid, positions, and rotary positions when kept."""
        return [self.keys, self.values, self.valid, self.positions] + ([self.rotary] if self.rotary is not None else [])

    def _resize(self, layer: int, capacity: int):
        keep = min(self.lengths[layer], capacity)
        for buffers in self._buffers():
            new = buffers[layer].new_zeros(*buffers[layer].shape[:2], capacity, *buffers[layer].shape[3:])
            new[:, :, :keep] = buffers[layer][:, :, :keep]
            buffers[layer] = new

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

    def _gather(self, layer: int, kept: torch.Tensor, headroom: int = HEADROOM):
        """Keep the entries marked in kept (B, H_kv, S), packed in position order at the front of the buffers.

        The buffers are reallocated at n + headroom slots (n: the largest head's count) unless
        they already have exactly that room, as at every decode cut after the first.
        """
        counts = kept.sum(-1)                                             # (B, H_kv)
        n = int(counts.max())
        index = kept.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :n]   # (B, H_kv, n) kept first
        capacity = n + headroom
        for buffers in self._buffers():
            old = buffers[layer]
            taken = old.gather(2, index if old.dim() == 3 else index[..., None].expand(-1, -1, -1, self.head_dim))
            if old.shape[2] != capacity:
                buffers[layer] = old.new_zeros(*old.shape[:2], capacity, *old.shape[3:])   # memory really shrinks
            buffers[layer][:, :, :n] = taken
        self.valid[layer] = torch.arange(capacity, device=self.device) < counts[..., None]   # (B, H_kv, capacity)
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

    # ------------------------------------------------------------------ compression during decoding

    def start_decoding(self, specs: list[Decoding]):
        """After the prompt's prefill: from now on every forward is a decode forward that counts.

        `specs` holds one Decoding per row. Counters start at zero, the query buffers empty; the
        answer's partition (fair eviction) starts at each row's next original position.
        """
        if len(specs) != self.batch_size:
            raise ValueError(f"decoding got {len(specs)} specs for a batch of {self.batch_size}")
        self.decoding = list(specs)
        self._buffer = max(min(s.buffer, s.interval) for s in specs)
        self.steps = torch.zeros(self.n_layers, self.batch_size, dtype=torch.long)
        self.recent_queries = [[] for _ in range(self.n_layers)]
        self.generated_from = self.next_index.cpu().clone()
        self.row_ids = list(range(self.batch_size))
        self.kept_at_end: dict[int, torch.Tensor] = {}
        self._rows_at_start = self.batch_size
        if any(s.rerotate for s in specs):
            if self.inv_freq is None:
                raise ValueError("re-rotation needs the model's RoPE frequencies: make the cache with model.new_cache()")
            if self.rotary is None:
                self.rotary = [p.clone() for p in self.positions]            # until now RoPE saw the original positions

    def stop_decoding(self):
        """End of generation: note what every live row still holds of its prompt (kept_at_end)."""
        if self.decoding is not None:
            for b in range(self.batch_size):
                self._note_kept_at_end(b)
        self.decoding, self.recent_queries = None, [[] for _ in range(self.n_layers)]

    def _note_kept_at_end(self, b: int):
        """kept_at_end[original row] (prompt length,): per prompt position, the fraction of KV heads still holding
        it, averaged over layers (the decode-time counterpart of keep_rate)."""
        n = int(self.generated_from[b])
        rates = []
        for valid, positions in zip(self.valid, self.positions):
            held = torch.zeros(self.kv_heads, n + 1, device=self.device)
            held.scatter_(1, positions[b].clamp(max=n).masked_fill(~valid[b], n), 1.0)   # invalid and answer -> n
            rates.append(held[:, :n].mean(0))
        self.kept_at_end[self.row_ids[b]] = torch.stack(rates).mean(0).cpu()

    @torch.no_grad()
    def cut_due(self, step: int):
        """After decode forward number `step` (1-based): cut every layer whose count reached a row's interval.

        kvpress cuts inside the attention layer's forward hook, right after its attention; a
        layer's cut changes nothing that a later layer reads in the same forward, so cutting
        every layer after the forward is the same computation. A row's counter resets at every
        cut, also when it held no more than the target (then nothing is evicted).
        """
        intervals = torch.tensor([s.interval for s in self.decoding])
        rerotated = set()
        for layer in range(self.n_layers):
            rows = (self.steps[layer] >= intervals).nonzero()[:, 0].tolist()
            if not rows:
                continue
            S = self.lengths[layer]
            kept = self.valid[layer][:, :, :S].clone()                   # (B, H_kv, S) rows not cut keep all
            log = [None] * self._rows_at_start if self.log_cuts else None
            for b in rows:
                kept[b] = self._decode_kept(layer, b)
                if log is not None:
                    positions = self.positions[layer][b, :, :S]
                    log[self.row_ids[b]] = [sorted(positions[h][kept[b, h]].tolist()) for h in range(self.kv_heads)]
            self._gather(layer, kept, headroom=max(s.interval for s in self.decoding))
            self.steps[layer, rows] = 0
            if log is not None:
                self.cut_log.append({"layer": layer, "step": step, "kept": log})
            for b in rows:
                if self.decoding[b].rerotate:
                    self._rerotate(layer, b)
                    rerotated.add(b)
        for b in rerotated:                    # the next token follows the longest head of the row's layers
            self.next_pos[b] = max(int(v[b].sum(-1).max()) for v in self.valid)

    def _decode_kept(self, layer: int, b: int) -> torch.Tensor:
        """Kept mask (H_kv, S) over the slots of row b in `layer`: its spec's choice among the valid entries.

        Each KV head's valid entries are gathered in position order. When every head holds the
        same tokens the policy scores them all in one call; otherwise it scores each head alone,
        with that head's query heads (then TOVA averages over those only). The queries of the
        last decode tokens sit at the last slots (nothing was evicted since the last cut); every
        other query is NaN, so a policy that reads one it was not given fails loudly.
        """
        spec = self.decoding[b]
        S = self.lengths[layer]
        valid = self.valid[layer][b, :, :S]                               # (H_kv, S)
        n_queries = min(int(self.steps[layer, b]), spec.buffer)
        recent = torch.cat([q[b:b + 1] for q in self.recent_queries[layer][-n_queries:]], dim=2)  # (1, H, n_q, D)
        group = recent.shape[1] // self.kv_heads
        held_positions = self.positions[layer][b, :, :S].masked_fill(~valid, -1)                  # (H_kv, S)
        same = bool((held_positions == held_positions[:1]).all())         # every head holds the same tokens
        heads = [list(range(self.kv_heads))] if same else [[h] for h in range(self.kv_heads)]
        held = valid.sum(-1)
        n = int(held.max())
        scores = torch.full((self.kv_heads, n), -INF, device=self.device)
        positions = torch.full((self.kv_heads, n), -1, dtype=torch.long, device=self.device)
        slots_of = []
        for chosen in heads:
            slots = valid[chosen[0]].nonzero()[:, 0]                      # (n_h,) position order
            m = len(slots)
            keys = self.keys[layer][b:b + 1, chosen][:, :, slots]         # (1, h, n_h, D)
            values = self.values[layer][b:b + 1, chosen][:, :, slots]
            query_heads = [h * group + g for h in chosen for g in range(group)]
            queries = torch.full((1, len(query_heads), m, self.head_dim), float("nan"),
                                 dtype=recent.dtype, device=self.device)  # (1, h * group, n_h, D)
            queries[:, :, m - n_queries:] = recent[:, query_heads]
            where = Layer(layer, self.n_layers, {}, None)
            head_scores = POLICIES[spec.policy](queries, keys, values, [(0, m)], where, **spec.options)[0]
            if torch.isnan(head_scores).any():
                raise RuntimeError(f"{spec.policy} read a query that decoding does not keep: "
                                   f"declare what it reads in policies.DECODE_QUERIES")
            scores[chosen, :m] = head_scores.float()
            positions[chosen, :m] = self.positions[layer][b][chosen][:, slots]
            slots_of += [(h, slots) for h in chosen]
        present = torch.arange(n, device=self.device) < held[:, None]    # (H_kv, n)
        where = Layer(layer, self.n_layers, {}, None)
        chosen_packed = decode_kept(spec, scores, present, positions, where, int(self.generated_from[b]))  # (H_kv, n)
        kept = torch.zeros_like(valid)
        for h, slots in slots_of:
            kept[h, slots] = chosen_packed[h, :len(slots)]
        return kept

    def _rerotate(self, layer: int, b: int):
        """Re-rotate row b's kept keys in `layer` to rotary positions 0 .. n_h - 1 (kvpress KeyRerotationPress).

        RoPE rotates each (first half, second half) pair of a key by position x frequency, and
        rotations add up: rotating by (new - old) undoes the old angle and applies the new one.
        """
        held = self.valid[layer][b].sum(-1)                               # (H_kv,)
        n = int(held.max())
        old = self.rotary[layer][b, :, :n]                                # (H_kv, n)
        new = torch.arange(n, device=self.device).expand_as(old)
        angles = (new - old).double()[..., None] * self.inv_freq.double()   # (H_kv, n, D/2)
        angles = torch.cat((angles, angles), dim=-1)
        keys = self.keys[layer][b, :, :n]
        first, second = keys.double().chunk(2, dim=-1)                   # rotate-half, as model.apply_rope
        rotated = (keys.double() * angles.cos() + torch.cat((-second, first), -1) * angles.sin()).to(keys.dtype)
        present = torch.arange(n, device=self.device) < held[:, None]    # (H_kv, n)
        self.keys[layer][b, :, :n] = torch.where(present[..., None], rotated, keys)
        self.rotary[layer][b, :, :n] = torch.where(present, new, old)

    # ------------------------------------------------------------------ reuse

    def select_rows(self, index: torch.Tensor):
        """Keep only these batch rows, in this order (generation drops the rows that finished)."""
        for buffers in self._buffers():
            buffers[:] = [b.index_select(0, index) for b in buffers]
        self.next_pos = self.next_pos.index_select(0, index)
        self.next_index = self.next_index.index_select(0, index)
        self.kept = [k.index_select(0, index) for k in self.kept]
        self.system_len = None if self.system_len is None else self.system_len.index_select(0, index)
        if self.decoding is not None:
            rows = index.tolist()
            for b in sorted(set(range(self.batch_size)) - set(rows)):    # rows that finished
                self._note_kept_at_end(b)
            self.decoding = [self.decoding[i] for i in rows]
            self.row_ids = [self.row_ids[i] for i in rows]
            self.steps = self.steps[:, index.cpu()]
            self.recent_queries = [[q.index_select(0, index) for q in queries] for queries in self.recent_queries]
            self.generated_from = self.generated_from[index.cpu()]
        self.batch_size = len(index)

    def checkpoint(self) -> dict:
        """A copy of the cache's state (e.g. the compressed system turn) to come back to with restore()."""
        n = self.lengths
        copy = lambda buffers: [b[:, :, :m].clone() for b, m in zip(buffers, n)]
        return dict(lengths=list(n), layouts=list(self.layouts),
                    keys=copy(self.keys), values=copy(self.values), valid=copy(self.valid),
                    positions=copy(self.positions), rotary=None if self.rotary is None else copy(self.rotary),
                    next_pos=self.next_pos.clone(), next_index=self.next_index.clone(),
                    kept=self.kept, system_len=self.system_len,
                    queries=list(self.queries) if self.record_queries else None)   # a prefill still to compress

    def restore(self, state: dict):
        """Return to a checkpoint: its rows, entries and positions, bit for bit; later writes are dropped."""
        rows = state["next_pos"].shape[0]
        self.rotary = None if state["rotary"] is None else [r.clone() for r in state["rotary"]]
        names = ["keys", "values", "valid", "positions"] + (["rotary"] if self.rotary is not None else [])
        for layer, n in enumerate(state["lengths"]):
            for name, buffers in zip(names, self._buffers()):
                saved = state[name][layer]
                if rows != self.batch_size or buffers[layer].shape[2] < n or name == "rotary":
                    buffers[layer] = saved.new_zeros(rows, self.kv_heads, n + HEADROOM, *saved.shape[3:])
                buffers[layer][:, :, n:] = 0
                buffers[layer][:, :, :n] = saved
        self.batch_size = rows
        self.lengths, self.layouts = list(state["lengths"]), list(state["layouts"])
        self.next_pos, self.next_index = state["next_pos"].clone(), state["next_index"].clone()
        self.kept, self.system_len = state["kept"], state["system_len"]
        self.record_queries = state["queries"] is not None
        self.queries = list(state["queries"]) if self.record_queries else [None] * self.n_layers
        self.stop_decoding()
