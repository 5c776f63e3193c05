"""Compression during decoding (kvpress 0.5.5's DecodingPress; docs/method.md section 9).

`Decoding` wraps a `Compression` as DecodingPress wraps a press: every `interval` decode forwards,
each layer's whole cache is cut to `target` entries per KV head through the prefill's pipeline
(policies.evict_row). `Cuts` runs one generation's cuts; `generate` only tells it where it is:

    cuts = Cuts(Decoding(Compression("knorm"), target=64))
    answer = generate(model, cache, user_ids, 256, cuts=cuts)
    cuts.kept_at_end[0]           # per prompt position: the share of KV heads still holding it
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model import apply_rope, rope_cos_sin
from policies import Compression, covering_spans, evict_row

# What a decode cut needs of a policy, from its options: how many of the newest queries it reads, and how many
# entries it protects (+inf). A policy absent here (H2O, Expected Attention, KVzip) cannot run at a cut.
DECODE = {
    "streaming_llm": lambda options: (0, options.get("n_sink", 4)),
    "knorm": lambda options: (0, 0),
    "random": lambda options: (0, 0),
    "snapkv": lambda options: (options.get("window", 16), options.get("window", 16)),
    "tova": lambda options: (1, 1),
    "keydiff": lambda options: (0, 0),
}


@dataclass
class Decoding:
    """Every `interval` decode forwards, cut each layer to `target` entries per KV head with `compression`
    (its ratio is the prefill's). The policy sees the queries of the last min(buffer, interval) tokens;
    `rerotate` moves the kept keys to positions 0 .. n-1. The target must leave room for the whitelist
    beside what the policy protects; with partitions, the answer is one more partition.
    """
    compression: Compression
    target: int
    interval: int = 16
    buffer: int = 16
    rerotate: bool = False

    def __post_init__(self):
        for name in ("target", "interval", "buffer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"decode {name} must be an integer >= 1, got {value!r}")
        policy = self.compression.policy
        if policy == "full":
            raise ValueError("decoding with policy 'full' evicts nothing: choose an evicting policy or leave decoding off")
        if policy not in DECODE:
            raise ValueError(f"{policy} reads the query of every cached token (or a replay of the turn), and a decode "
                             f"cut keeps only the newest queries: choose one of {', '.join(DECODE)} for decoding")
        (needed, protected), seen = DECODE[policy](self.compression.options), min(self.buffer, self.interval)
        if needed > seen:
            raise ValueError(f"{policy} reads the last {needed} queries, but a decode cut sees {seen} "
                             f"(buffer {self.buffer}, interval {self.interval}): raise both to at least {needed}")
        listed = len(set(self.compression.whitelist or ()))
        if listed and listed + protected >= self.target:
            beside = f" and the {protected} entries {policy} protects" if protected else ""
            raise ValueError(f"decode target {self.target} must exceed the {listed} whitelisted positions that no cut "
                             f"evicts{beside}")


class Cuts:
    """One generation's decode-time cuts: counts each row's decode forwards and cuts all layers of a row whose
    count reached its interval. `log`: one dict per (cut, layer), {"layer", "step", "kept": per original row
    the sorted positions each KV head kept, or None} (with `explain`, also what was ranked). `kept_at_end`:
    {original row: per prompt position, the share of KV heads still holding it, averaged over layers}.
    """

    def __init__(self, decoding: Decoding | list[Decoding], log: bool = False, explain: bool = False):
        self.decoding, self.log, self.explain = decoding, [] if log else None, explain
        self.kept_at_end: dict[int, torch.Tensor] = {}

    def start(self, cache):
        """After the prompt's prefill: from now on every forward is a decode forward that counts."""
        rows = cache.batch_size
        self.specs = self.decoding if isinstance(self.decoding, list) else [self.decoding] * rows
        if len(self.specs) != rows:
            raise ValueError(f"decoding got {len(self.specs)} specs for a batch of {rows}")
        self.rows, self.n_rows = list(range(rows)), rows          # the original row of each live row
        self.steps = [0] * rows                                  # decode forwards since the row's last cut
        self.prompt_len = cache.next_position.tolist()           # where each row's answer starts
        cache.record_queries(limit=max(min(s.buffer, s.interval) for s in self.specs))
        if any(s.rerotate for s in self.specs):
            if cache.inv_freq is None:
                raise ValueError("re-rotation needs the model's RoPE frequencies: make the cache with model.new_cache()")
            if any(cache.exempt):
                raise ValueError("re-rotation is not implemented for Gemma 3: its local layers have their own RoPE")
            cache.track_rotary()                                 # until now RoPE saw the original positions

    def after_forward(self, cache, step: int):
        """After decode forward number `step`: cut each row whose count reached its interval (kvpress cuts inside
        each layer, after its attention: the same computation). A count restarts at every cut, even one that
        evicts nothing."""
        self.steps = [n + 1 for n in self.steps]
        due = [b for b, (n, s) in enumerate(zip(self.steps, self.specs)) if n >= s.interval]
        if not due:
            return
        masks, explained = {}, {}
        for b in due:
            spec = self.specs[b]
            parts = spec.compression.partitions
            starts = [s for s, _ in covering_spans(parts, self.prompt_len[b])] + [self.prompt_len[b]] if parts else None
            explained[b] = [] if self.explain else None
            masks[b] = evict_row(spec.compression, spec.target, cache, b, None, part_starts=starts,
                                 n_queries=min(self.steps[b], spec.buffer), span_local=False, explain=explained[b])
        for layer in range(cache.n_layers):
            S = cache.lengths[layer]
            kept = cache.valid[layer][:, :, :S].clone()                  # (B, H_kv, S): rows not cut keep all
            for b in due:
                kept[b] = masks[b][layer]
            if self.log is not None:
                self.note(cache, layer, step, kept, due, explained)
            cache.keep(layer, kept, headroom=max(s.interval for s in self.specs))
            for b in due:
                if self.specs[b].rerotate:
                    rerotate(cache, layer, b)
        for b in due:
            self.steps[b] = 0
            if self.specs[b].rerotate:                           # the next token follows the row's longest head
                cache.next_rotary[b] = max(int(v[b].sum(-1).max()) for v in cache.valid)

    def note(self, cache, layer: int, step: int, kept: torch.Tensor, due: list[int], explained: dict):
        entry = {"layer": layer, "step": step, "kept": [None] * self.n_rows}
        for b in due:
            positions = cache.positions[layer][b, :, :kept.shape[2]]
            entry["kept"][self.rows[b]] = [sorted(positions[h][kept[b, h]].tolist()) for h in range(cache.kv_heads)]
        if self.explain:
            entry["explained"] = {self.rows[b]: explained[b][layer] for b in due}
        self.log.append(entry)

    def keep_rows(self, cache, index: torch.Tensor):
        """Before cache.select_rows(index): the rows that leave note what they kept; the others go on."""
        stay = index.tolist()
        for b in sorted(set(range(len(self.rows))) - set(stay)):
            self.note_kept_at_end(cache, b)
        self.specs, self.rows = [self.specs[i] for i in stay], [self.rows[i] for i in stay]
        self.steps, self.prompt_len = [self.steps[i] for i in stay], [self.prompt_len[i] for i in stay]

    def finish(self, cache):
        """End of generation: every row still live notes what it kept; the cache stops recording queries."""
        for b in range(len(self.rows)):
            self.note_kept_at_end(cache, b)
        cache.stop_recording()

    def note_kept_at_end(self, cache, b: int):
        n = self.prompt_len[b]
        rates = []
        for valid, positions in zip(cache.valid, cache.positions):
            held = torch.zeros(cache.kv_heads, n + 1, device=cache.device)
            held.scatter_(1, positions[b].clamp(max=n).masked_fill(~valid[b], n), 1.0)   # invalid and answer -> n
            rates.append(held[:, :n].mean(0))
        self.kept_at_end[self.rows[b]] = torch.stack(rates).mean(0).cpu()


def rerotate(cache, layer: int, b: int):
    """Re-rotate row b's kept keys in `layer` to positions 0 .. n_h - 1 (kvpress KeyRerotationPress): rotations
    add up, so rotating by (new - old), in float64, undoes the old angle and applies the new one."""
    held = cache.valid[layer][b].sum(-1)                                 # (H_kv,)
    n = int(held.max())
    old = cache.rotary[layer][b, :, :n]                                  # (H_kv, n)
    new = torch.arange(n, device=cache.device).expand_as(old)
    cos, sin = rope_cos_sin(cache.inv_freq.double(), new - old, torch.float64)     # (H_kv, 1, n, D)
    keys = cache.keys[layer][b, :, :n]
    rotated = apply_rope(keys.double()[:, None], cos, sin)[:, 0].to(keys.dtype)
    present = torch.arange(n, device=cache.device) < held[:, None]       # (H_kv, n)
    cache.keys[layer][b, :, :n] = torch.where(present[..., None], rotated, keys)
    cache.rotary[layer][b, :, :n] = torch.where(present, new, old)
