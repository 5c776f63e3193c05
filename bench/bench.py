"""Benchmarks: decode speed, the compress step's cost, H2O's memory, batched and ragged runs.

    python bench/bench.py                                   # the default sections, a few minutes on 2 cores
    python bench/bench.py --only compress --lengths 100,1000
    python bench/bench.py --only decode,compress --baseline de076ae --no-hf   # this tree against a revision
    python bench/bench.py --only decode,h2o-memory --json out.json

Sections (each prints one plain table):
  decode      prefill and decode tokens/s at batch 1, float32 and bfloat16, on the default model; with
              transformers installed, the same for HF `generate` on the same folder; with --baseline REV,
              the same for the core of git revision REV; and ours / each of them
  compress    what compression adds per policy, as a share of the system turn's prefill time, for system
              turns of about 100, 1,000 and 4,000 tokens at ratio 0.5: the compression step (score,
              select, gather in every layer), plus for H2O the prefill's extra time to sum its scores,
              plus for KVzip its replay of the turn (target: <= 10% for the paper's five policies; KVzip
              about 2x); with --baseline REV also REV's core (where it has the policy: "-" otherwise)
  h2o-memory  peak extra memory of H2O's sums (in the prefill, or its own blockwise pass) vs the
              full L x L matrix
  batch       prompts per minute of the default evaluate.py workload at batch 1/4/8/16, float32
              and bfloat16, and KV-cache memory per row
  ragged      decode tokens/s at batch 1 after compressing a long system turn (snapkv, r = 0.5) with
              each allocation, and the KV bytes held; with --baseline REV also REV's core (uniform)
  decoding    compression during decoding: --decoding-tokens greedy tokens (default 2,000) after the
              chat prompt at batch 1, float32, with the cache cut to --decoding-target entries per KV
              head (knorm, every 16 steps) and without; peak cache bytes, most entries per head, decode tok/s
              (several minutes: only with --only decoding)
  window      the cache of a sliding-window model (every layer given --window) on a prompt several
              times longer than the window: entries and bytes held, with and without the window

--baseline REV imports model.py, cache.py and policies.py (and decoding.py where REV has one) of a git
revision as separate modules, so that one run times both cores on the same inputs. Either core API works:
the redesign's (policies.prefill / compress, decoding.py) and the one before it (cache.prepare, the model's
forward, cache.compress; e.g. de076ae).

Timings are medians of `--repeats` runs with the compared runs interleaved, the order alternating from one
repeat to the next, since the machine is shared and noisy; IQR is the middle half of the runs (inclusive
quartiles). transformers is used only here, never by the project itself.
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))          # the project: bench/..
sys.path.insert(0, ROOT)

from model import DTYPES, ModelArgs  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

DEFAULT_FOLDER = os.path.join(ROOT, "weights", "smollm2-135m-instruct")
CORE = ("cache", "model", "policies", "decoding")          # the modules a revision's core is made of
POLICY_NAMES = ("streaming_llm", "h2o", "knorm", "snapkv", "tova")      # the paper's five
CHAT_SYSTEM = "You are a friendly assistant for a small bakery. Answer in plain English, in two or three sentences."
CHAT_USER = ("A customer asks: which of your breads keep best for a whole week, how should they be stored at "
             "home, and can they be frozen and thawed without getting dry? Also mention whether any of them "
             "are made without dairy or eggs, and which one you would recommend for sandwiches.")
SENTENCES = [
    "The {adj} {noun} near the {place} was {verb} by a {adj2} {noun2}.",
    "Every {noun} in the {place} must be {verb} before the {adj} {noun2} arrives.",
    "Please keep the {noun} {adj} and never leave it in the {place}.",
    "A {adj} {noun2} once {verb} three {noun}s on the way to the {place}.",
    "When the {noun} is {adj}, answer briefly and mention the {noun2}.",
    "Nobody expected the {adj2} {noun} to be {verb} so close to the {place}.",
]
WORDS = {
    "adj": ["quiet", "bright", "heavy", "curious", "ancient", "narrow", "gentle", "sharp"],
    "adj2": ["tired", "clever", "silver", "noisy", "patient", "distant", "golden", "humble"],
    "noun": ["lantern", "river", "ledger", "engine", "garden", "violin", "harbor", "compass"],
    "noun2": ["baker", "pilot", "teacher", "sailor", "painter", "farmer", "judge", "clerk"],
    "place": ["station", "market", "library", "valley", "bridge", "museum", "orchard", "tower"],
    "verb": ["painted", "repaired", "counted", "carried", "measured", "borrowed", "polished", "described"],
}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def number(x) -> str:
    if not isinstance(x, float):
        return str(x)
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def print_table(title: str, header: list[str], rows: list[list]):
    cells = [header] + [[number(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def iqr(values: list[float], scale: float = 1.0) -> str:
    """The middle half of the runs as 'q1..q3' (inclusive quartiles), times `scale`; '-' for fewer than 2."""
    if len(values) < 2:
        return "-"
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return f"{number(scale * q1)}..{number(scale * q3)}"


def alternate(items: list, repeat: int) -> list:
    """The order of the compared runs in one repeat: as given, then reversed, so neither always goes first."""
    return list(items) if repeat % 2 == 0 else list(items)[::-1]


# ----------------------------------------------------------------------------- one revision's core

class Code:
    """The core of one revision (this tree's, or --baseline's) behind the few calls the bench times.

    Two APIs: the redesign's (decoding.py exists; policies.prefill / compress, H2O's observer passed to
    the model) and the one before it (de076ae: cache.prepare, the model's forward, cache.compress; H2O's
    observer inside the cache). A recorded prefill's state is {"cache", "observed"}: what compress reads.
    """

    def __init__(self, name: str, modules: dict):
        self.name, self.modules = name, modules
        self.policies = modules["policies"]
        self.redesigned = "decoding" in modules

    def has(self, policy: str, allocation: str = "uniform") -> bool:
        return policy in self.policies.POLICIES and allocation in self.policies.ALLOCATIONS

    def spec(self, policy: str, ratio: float = 0.5, allocation: str = "uniform"):
        return self.policies.Compression(policy, ratio, allocation=allocation)

    def load(self, folder: str, dtype: str = "float32"):
        return self.modules["model"].load_model(folder, dtype=dtype)

    def runner(self, folder: str, dtype: str, ids: torch.Tensor) -> dict:
        """Its model in `dtype`: 'prefill' (one forward of ids into an empty cache) and 'generate'(n) tokens."""
        model, generate = self.load(folder, dtype), self.modules["model"].generate
        return {"prefill": lambda: forward(model, model.new_cache(), ids),
                "generate": lambda n: generate(model, model.new_cache(), ids, n, stop_ids=[])[0]}

    @torch.no_grad()
    def recorded_prefill(self, model, ids: torch.Tensor, observe: str | None = None) -> dict:
        """The protocol's prefill of a system turn (1, L) into a fresh cache, recording the queries, and with
        observe='h2o' through H2O's observer (its sums): the state compress() starts from."""
        cache = model.new_cache(capacity=ids.shape[1] + 64)
        spec = self.spec(observe or "snapkv")                   # snapkv reads the queries only
        if not self.redesigned:
            cache.prepare([spec])
            model(ids, cache)
            return {"cache": cache, "observed": None}
        cache.record_queries()
        observer = self.policies.observer_for([spec])
        model(ids, cache, attention=observer)
        return {"cache": cache, "observed": None if observer is None else observer.records}

    @torch.no_grad()
    def replay(self, model, state: dict, ids: torch.Tensor, replay) -> dict:
        """KVzip's replay of the turn over a recorded prefill (the cache comes back unchanged): its state."""
        scores = self.policies.replay_turns(model, state["cache"], [ids[0].tolist()], [self.spec("kvzip")], [replay])
        return {"cache": state["cache"], "observed": scores}

    @torch.no_grad()
    def compress(self, state: dict, spec):
        if not self.redesigned:
            return state["cache"].compress(spec)
        return self.policies.compress(state["cache"], spec, observed=state["observed"])

    @torch.no_grad()
    def compressed_cache(self, model, ids: torch.Tensor, spec) -> tuple:
        """A cache holding the system turn (1, L) compressed by `spec`, and per layer its kept mask (1, H_kv, L)."""
        cache = model.new_cache(capacity=ids.shape[1])
        if self.redesigned:
            return cache, self.policies.prefill(model, cache, ids, spec).kept
        cache.prepare([spec])
        model(ids, cache)
        cache.compress(spec)
        return cache, cache.kept


@torch.no_grad()
def forward(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """One forward of ids (B, T) after what the cache holds: the last token's logits (B, V)."""
    return model(ids, cache)


@functools.cache
def this_tree() -> Code:
    return Code("ours", {name: importlib.import_module(name) for name in CORE})


@functools.cache
def load_baseline(revision: str) -> Code:
    """The core modules of git revision `revision`, imported apart from this tree's (as baseline_model, ...;
    their imports of one another rewritten to match)."""
    folder = tempfile.mkdtemp(prefix="nanokv-baseline-")
    imports = re.compile(rf"^(\s*)(from|import) ({'|'.join(CORE)})\b", re.MULTILINE)
    names = []
    for name in CORE:
        shown = subprocess.run(["git", "-C", ROOT, "show", f"{revision}:{name}.py"], capture_output=True, text=True)
        if shown.returncode != 0:
            if name == "decoding":                              # before the redesign: no decoding.py
                continue
            raise SystemExit(f"error: --baseline {revision}: git cannot show {name}.py there "
                             f"({shown.stderr.strip().splitlines()[-1] if shown.stderr.strip() else 'no output'})")
        source = imports.sub(lambda m: f"{m[1]}{m[2]} baseline_{m[3]}" + (f" as {m[3]}" if m[2] == "import" else ""),
                             shown.stdout)
        with open(os.path.join(folder, f"baseline_{name}.py"), "w") as f:
            f.write(source)
        names.append(name)
    sys.path.insert(0, folder)
    try:
        modules = {name: importlib.import_module(f"baseline_{name}") for name in names}
    finally:
        sys.path.remove(folder)
    return Code(revision, modules)


# ----------------------------------------------------------------------------- decode

def bench_decode(args) -> dict:
    """Prefill and decode tokens/s at batch 1, greedy, no stop: ours, and (if given) a baseline revision's
    and (if installed) HF's.

    prefill tok/s = prompt tokens / time of one forward over the prompt into an empty cache.
    decode tok/s  = (N - 1) / (time of generating N tokens - time of generating 1 token): the
    tokens produced after the first one, over the time after the first one. Every side is timed
    with the same method through its own `generate`, so setup costs cancel. In each repeat every
    side runs each measurement in turn (prefill, 1 token, N tokens); ours / other is the median of
    the per-repeat ratios, with their IQR.
    """
    tokenizer = load_tokenizer(args.folder)
    ids = torch.tensor([tokenizer.chat_ids(CHAT_SYSTEM, CHAT_USER)[1].ids])               # (1, T)
    T, n_new = ids.shape[1], args.new_tokens
    hf_available = _transformers_available() and not args.no_hf
    codes = [this_tree()] + ([load_baseline(args.baseline)] if args.baseline else [])
    rows, results = [], {"prompt_tokens": T, "new_tokens": n_new, "runs": {}}
    for dtype in args.decode_dtypes.split(","):
        runners = {code.name: code.runner(args.folder, dtype, ids) for code in codes}
        if hf_available:
            runners["HF"] = _hf_runner(args.folder, dtype, ids)
        for runner in runners.values():                                                  # warm up
            runner["generate"](2)
        times = {name: {"prefill": [], "one": [], "all": []} for name in runners}
        for repeat in range(args.repeats):                                               # interleaved
            for kind, run in (("prefill", lambda r: r["prefill"]()), ("one", lambda r: r["generate"](1)),
                              ("all", lambda r: r["generate"](n_new))):
                for name in alternate(runners, repeat):
                    times[name][kind].append(timed(functools.partial(run, runners[name])))
        tokens = {name: runner["generate"](n_new) for name, runner in runners.items()}
        speeds = {name: {"prefill": [T / s for s in t["prefill"]],
                         "decode": [(n_new - 1) / (a - o) for a, o in zip(t["all"], t["one"])]}
                  for name, t in times.items()}
        results["runs"][dtype] = {}
        for name in runners:
            assert len(tokens[name]) == n_new, f"{name} produced {len(tokens[name])} tokens, not {n_new}"
            s = speeds[name]
            row = [dtype, name, statistics.median(s["prefill"]), iqr(s["prefill"]),
                   statistics.median(s["decode"]), iqr(s["decode"])]
            out = {"prefill_tok_s": row[2], "decode_tok_s": row[4], "prefill_tok_s_runs": s["prefill"],
                   "decode_tok_s_runs": s["decode"], "same_tokens_as_ours": _same_prefix(tokens["ours"], tokens[name])}
            for kind in ("prefill", "decode"):
                ratios = [a / b for a, b in zip(speeds["ours"][kind], s[kind])]
                row += ["-", ""] if name == "ours" else [statistics.median(ratios), iqr(ratios)]
                out[f"ours_over_this_{kind}"] = statistics.median(ratios)
            rows.append(row + [f"{out['same_tokens_as_ours']}/{n_new}"])
            results["runs"][dtype][name] = out
        del runners
    print_table(f"decode: batch 1, greedy, prompt {T} tokens, {n_new} new tokens, median of {args.repeats} "
                f"(interleaved); ours / this: the median of the per-repeat ratios",
                ["dtype", "code", "prefill tok/s", "IQR", "decode tok/s", "IQR", "ours/this prefill", "IQR",
                 "ours/this decode", "IQR", "same tokens as ours"], rows)
    if not hf_available:
        print("(transformers not importable or --no-hf: no HF comparison)")
    return results


def _hf_runner(folder: str, dtype: str, ids):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    mask = torch.ones_like(ids)
    pad = model.generation_config.pad_token_id or model.generation_config.eos_token_id

    @torch.no_grad()
    def hf_prefill():                      # what generate's first step runs: logits of the last token only
        return model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

    def hf_generate(n: int) -> list[int]:
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             pad_token_id=pad)
        return out[0, ids.shape[1]:].tolist()

    return {"prefill": hf_prefill, "generate": hf_generate}


def _transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def _same_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ----------------------------------------------------------------------------- compress

def synthetic_system_text(tokenizer, target_len: int, seed: int = 0) -> str:
    """A system message whose chat-templated turn has about `target_len` tokens of varied synthetic sentences."""
    rng = random.Random(seed)
    overhead = len(tokenizer.encode_chat([{"role": "system", "content": ""}], add_generation_prompt=False).ids)
    sentences, n_tokens = [], overhead
    while n_tokens < target_len:
        sentence = rng.choice(SENTENCES).format(**{k: rng.choice(v) for k, v in WORDS.items()})
        sentences.append(sentence)
        n_tokens += len(tokenizer.encode(" " + sentence))       # close: BPE pieces never cross a space
    return " ".join(sentences)


def synthetic_system_turn(tokenizer, target_len: int, seed: int = 0):
    """The chat-templated system turn (a ChatEncoding) of about `target_len` tokens of synthetic sentences."""
    messages = [{"role": "system", "content": synthetic_system_text(tokenizer, target_len, seed)}]
    return tokenizer.encode_chat(messages, add_generation_prompt=False)


# The compress table's rows: (label, policy, allocation, the recorded state it compresses). "plain": the
# prefill recorded its queries; "sums": also H2O's observer, whose extra prefill time counts; "replay": the
# plain prefill, then KVzip's replay of the turn, whose time counts.
COMPRESS_RUNS = [
    ("streaming_llm", "streaming_llm", "uniform", "plain"),
    ("knorm", "knorm", "uniform", "plain"),
    ("snapkv", "snapkv", "uniform", "plain"),
    ("tova", "tova", "uniform", "plain"),
    ("h2o", "h2o", "uniform", "sums"),
    ("h2o own pass", "h2o", "uniform", "plain"),           # its blockwise pass, as fair eviction runs it
    ("kvzip", "kvzip", "uniform", "replay"),
    ("kvzip global", "kvzip", "global", "replay"),
]


def bench_compress(args) -> dict:
    """What compression adds to the system turn's prefill, per policy, as a share of it.

    The base is the protocol's prefill: a fresh cache recording the queries. For every policy the
    cost is the time of its compress (all layers: score, select, gather), on a copy of a recorded
    prefill; for H2O plus the extra time of the prefill through its observer (the sums it reads),
    for KVzip plus its replay of the turn (the replay passes: the cache comes back unchanged).
    "h2o own pass" is H2O scoring without the sums (its blockwise pass, which fair eviction uses).
    With --baseline REV, REV's core runs the same steps on the same turns, each step alternating
    between the two; a revision without a policy or allocation shows "-". ours/REV: the ratio of the
    median costs.

    A whole prefill varies by several percent from run to run on a shared machine, so the sums'
    cost is also measured where it arises, with less noise: one layer's attention with the model's
    shapes, flash (SDPA) vs attention_with_received, interleaved, 5 x `repeats` times; the
    difference times the number of layers, plus H2O's compress, over the prefill: "h2o (attention)".
    """
    tokenizer = load_tokenizer(args.folder)
    codes = [this_tree()] + ([load_baseline(args.baseline)] if args.baseline else [])
    models = {code.name: code.load(args.folder) for code in codes}
    warm = torch.tensor([synthetic_system_turn(tokenizer, 100).ids])
    for code in codes:                                                                  # warm up
        code.recorded_prefill(models[code.name], warm)
    runs = {code.name: [run for run in COMPRESS_RUNS if code.has(*run[1:3])] for code in codes}
    rows, results = [], {}
    for target in args.lengths:
        system = synthetic_system_turn(tokenizer, target)
        ids, replay = torch.tensor([system.ids]), tokenizer.replay(system)               # (1, L)
        L = ids.shape[1]
        prefill_s, compress_s = time_compress_steps(args.repeats, codes, models, runs, ids, replay)
        flash_s, sums_s = attention_times(model_shape(args.folder), L, 5 * args.repeats, codes)
        results[str(L)] = {}
        for code in codes:
            attention = models[code.name].args.n_layers * (sums_s[code.name] - flash_s)
            results[str(L)][code.name] = compress_result(args.repeats, runs[code.name], prefill_s[code.name],
                                                         compress_s[code.name], attention,
                                                         {"flash": flash_s, "with_sums": sums_s[code.name]})
        rows += compress_rows(L, codes, results[str(L)])
    print_compress_report(args.repeats, codes, rows, results)
    return results


def time_compress_steps(repeats: int, codes: list[Code], models: dict, runs: dict, ids: torch.Tensor,
                        replay) -> tuple[dict, dict]:
    """Seconds per repeat, per code: its recorded prefills ("plain", "sums", "replay") of the turn, and
    each of its compress runs on a copy of the state it reads; every step alternates between the codes."""
    prefill_s = {code.name: {"plain": [], "sums": [], "replay": []} for code in codes}   # per repeat
    compress_s = {code.name: {run[0]: [] for run in runs[code.name]} for code in codes}
    for repeat in range(repeats):
        order, states = alternate(codes, repeat), {}
        for reads in ("plain", "sums", "replay"):                                  # each step: every code
            for code in order:
                if reads == "replay" and not code.has("kvzip"):
                    continue
                start = time.perf_counter()
                states[code.name, reads] = (code.replay(models[code.name], states[code.name, "plain"], ids, replay)
                                            if reads == "replay" else
                                            code.recorded_prefill(models[code.name], ids, "h2o" if reads == "sums" else None))
                prefill_s[code.name][reads].append(time.perf_counter() - start)
        for label, policy, allocation, reads in COMPRESS_RUNS:
            for code in order:
                if not code.has(policy, allocation):
                    continue
                state = copy.deepcopy(states[code.name, reads])                    # compress changes it
                spec = code.spec(policy, 0.5, allocation)
                compress_s[code.name][label].append(timed(functools.partial(code.compress, state, spec)))
                del state
        del states
    return prefill_s, compress_s


def compress_result(repeats: int, runs: list, p: dict, c: dict, attention: float, layer_attention: dict) -> dict:
    """One code's numbers for one turn: each run's cost (the extra prefill time of the state it reads, plus
    its compress), its median and its share of the plain prefill. `attention`: the sums' extra attention
    time in all layers, for "h2o (attention)"."""
    extra = {"plain": [0.0] * repeats, "sums": [s - q for s, q in zip(p["sums"], p["plain"])],
             "replay": p["replay"]}
    cost = {label: [e + t for e, t in zip(extra[reads], c[label])] for label, _, _, reads in runs}
    cost["h2o (attention)"] = [attention + t for t in c["h2o"]]
    return {
        "prefill_s": statistics.median(p["plain"]), "prefill_s_runs": p["plain"],
        "prefill_with_sums_s_runs": p["sums"], "replay_s_runs": p["replay"], "compress_s_runs": c,
        "layer_attention_s": layer_attention,
        "cost_s": {label: statistics.median(t) for label, t in cost.items()}, "cost_s_runs": cost,
        "fraction": {label: statistics.median(t) / statistics.median(p["plain"]) for label, t in cost.items()}}


def print_compress_report(repeats: int, codes: list[Code], rows: list[list], results: dict):
    """The compress table, the policies over the 10% target, and KVzip's replay and selection per turn."""
    names = [code.name for code in codes]
    header = ["L", "step"]
    for name in names:
        header += [f"{name} ms", "IQR", "% prefill"]
    if len(codes) > 1:
        header += [f"{names[0]}/{names[1]}"]
    print_table(f"compress: what compression (ratio 0.5) adds to the system prefill, all layers, median of "
                f"{repeats} (target <= 10% at L >= 1000 for the paper's five); h2o = the prefill's extra time "
                "for its sums + its compress; kvzip = its replay + its compress", header, rows)
    ours = {L: r["ours"] for L, r in results.items()}
    over = [f"{name} at L={L} ({100 * r['fraction'][name]:.1f}%)" for L, r in ours.items() if int(L) >= 1000
            for name in POLICY_NAMES if r["fraction"][name] > 0.10]
    print("over the 10% target: " + (", ".join(over) if over else "none"))
    for L, r in ours.items():
        replay_ms = 1000 * statistics.median(r["replay_s_runs"])
        print(f"kvzip at L={L}: replay {replay_ms:,.0f} ms + selection "
              f"{1000 * statistics.median(r['compress_s_runs']['kvzip']):,.1f} ms (uniform) / "
              f"{1000 * statistics.median(r['compress_s_runs']['kvzip global']):,.1f} ms (global) = "
              f"{r['fraction']['kvzip']:.2f}x / {r['fraction']['kvzip global']:.2f}x the prefill")


def compress_rows(L: int, codes: list[Code], results: dict) -> list[list]:
    """The compress table's rows for one turn: the prefill, then each step's cost per code."""
    rows = []
    labels = ["prefill"] + [run[0] for run in COMPRESS_RUNS] + ["h2o (attention)"]
    for label in labels:
        row, medians = [L, label], []
        for code in codes:
            r = results[code.name]
            runs = r["prefill_s_runs"] if label == "prefill" else r["cost_s_runs"].get(label)
            if runs is None:
                row += ["-", "-", "-"]
                medians.append(None)
                continue
            median = statistics.median(runs)
            row += [1000 * median, iqr(runs, 1000), "" if label == "prefill" else f"{100 * median / r['prefill_s']:.1f}%"]
            medians.append(median)
        if len(codes) > 1:
            row.append(f"{medians[0] / medians[1]:.2f}" if None not in medians and medians[1] > 0 else "-")
        rows.append(row)
    return rows


def attention_times(shape: ModelArgs, L: int, repeats: int, codes: list[Code]) -> tuple[float, dict]:
    """Median seconds of one layer's causal attention over L tokens: flash (SDPA), and with H2O's sums as each
    code's attention_with_received computes them (interleaved)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, shape.n_heads, L, shape.head_dim, generator=gen)
    k, v = (torch.randn(1, shape.n_kv_heads, L, shape.head_dim, generator=gen) for _ in range(2))
    runs = {"flash": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
    for code in codes:
        scratch = {}                                         # as the prefill lends it from layer to layer
        runs[code.name] = functools.partial(code.policies.attention_with_received, q, k, v, None, scratch=scratch)
    times = {name: [] for name in runs}
    for run in runs.values():
        run()                                                # warm up
    for repeat in range(repeats):                            # interleaved
        for name in alternate(runs, repeat):
            times[name].append(timed(runs[name]))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return medians.pop("flash"), medians


# ----------------------------------------------------------------------------- h2o-memory

def bench_h2o_memory(args) -> dict:
    """Peak extra memory of H2O's sums for one layer: in the prefill, in its own pass, as a full matrix.

    analytic: bytes of the largest intermediates alive at once, float32.
      in prefill: policies.attention_with_received (block 64): a block's logits and probabilities,
                  (H, 64, L) each, the keys and values copied twice, the output and the sums
      own pass:   policies.h2o (block 32): a block's logits and its softmax, (H, 32, L) each,
                  plus the (H, L) sums
      full:       the logits and the softmax of every head, (H, L, L) each, plus the (L, L) bool mask
    measured: growth of the peak resident memory (VmHWM in /proc/self/status) of a fresh process
      while it scores one layer of random queries/keys with the default model's shapes, after a
      warm-up; it includes what the allocator keeps, so it is an upper bound of the live bytes.
    """
    shape = model_shape(args.folder)
    H, kv, D = shape.n_heads, shape.n_kv_heads, shape.head_dim
    rows, results = [], {}
    for L in args.memory_lengths:
        analytic = {"in prefill": 4 * (2 * H * min(64, L) * L + 4 * kv * L * D + H * L * D + 2 * kv * L),
                    "own pass": 4 * (2 * H * min(32, L) * L + 2 * H * L), "full": 4 * 2 * H * L * L + L * L}
        measured = {method: _peak_growth_in_subprocess(args, method, L) for method in analytic}
        rows.append([L] + [f"{_mb(analytic[m])} / {_mb(measured[m])}" for m in analytic]
                    + [f"{measured['full'] / max(measured['in prefill'], 1):.0f}x"])
        results[str(L)] = {"analytic_bytes": analytic, "measured_bytes": measured}
    print_table(f"h2o-memory: peak extra memory of H2O's sums for one layer ({H} query heads, float32), MB: "
                "analytic (largest live intermediates) / measured (peak RSS growth in a fresh process)",
                ["L", "in prefill", "own pass", "full LxL", "full / in prefill"], rows)
    return results


def model_shape(folder: str) -> ModelArgs:
    with open(os.path.join(folder, "config.json")) as f:
        return ModelArgs.from_hf_config(json.load(f))


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


def _peak_growth_in_subprocess(args, method: str, L: int) -> int:
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", method, str(L), "--folder", args.folder]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def full_matrix_h2o(queries, keys):
    """H2O scores from the whole causal attention matrix at once, as eager attention gives it. (1, H_kv, L)"""
    H, kv_heads, L, D = queries.shape[1], keys.shape[1], keys.shape[2], keys.shape[3]
    keys = keys[0].repeat_interleave(H // kv_heads, dim=0)                               # (H, L, D)
    logits = (queries[0] @ keys.transpose(1, 2)).div_(math.sqrt(D))                    # (H, L, L)
    logits.masked_fill_(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)          # causal
    attn = logits.softmax(-1)                                                            # (H, L, L)
    n_queries = torch.arange(L, 0, -1)
    return (attn.sum(1) / n_queries).view(kv_heads, H // kv_heads, L).mean(1)[None]


def memory_probe(folder: str, method: str, L: int):
    """Run in a fresh process: print the growth of peak RSS (bytes) while scoring one layer."""
    from policies import Context, attention_with_received, h2o
    shape = model_shape(folder)
    score = {"in prefill": lambda q, k: attention_with_received(q, k, k, None),
             "own pass": lambda q, k: h2o(q, k, k, [(0, q.shape[2])], Context(0, 1)), "full": full_matrix_h2o}[method]
    def inputs(n):
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(1, shape.n_heads, n, shape.head_dim, generator=gen),
                torch.randn(1, shape.n_kv_heads, n, shape.head_dim, generator=gen))
    score(*inputs(64))                                       # warm up: thread pools, kernels, allocator
    queries, keys = inputs(L)
    before = _status_bytes("VmRSS")
    try:                                                     # reset the peak (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass                                                 # then the peak may include the small warm-up
    score(queries, keys)
    print(_status_bytes("VmHWM") - before)


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux), in bytes. Unlike ru_maxrss, VmHWM is not
    inherited from the parent process, whose peak would hide the child's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024           # the file says kB
    raise RuntimeError(f"no {field} in /proc/self/status: the memory probe needs Linux")


# ----------------------------------------------------------------------------- batch

def bench_batch(args) -> dict:
    """Prompts per minute of the default evaluate.py workload at several batch sizes.

    The jobs are exactly those of `python evaluate.py` with its defaults, except for the
    policies, ratios and number of prompts (--batch-prompts, --batch-ratios): built-in
    prompts, defense first, 96 new tokens. Each batch size runs the same jobs through
    experiment.run_batch; we report prompts/minute, generated tokens/s, the speed-up over
    batch 1, and the KV-cache memory per row (keys + values of the compressed system turn
    and the answer, all layers).
    """
    import evaluate
    from experiment import build_jobs, load_model_and_tokenizer, make_batches, run_batch
    from flags import parse_args, plan_run

    rows, out = [], {}
    for dtype in args.batch_dtypes.split(","):
        flags = parse_args(evaluate.EVALUATE, ["--policy", "tova", "--ratios", args.batch_ratios, "--limit",
                                               str(args.batch_prompts), "--max-new-tokens", "96", "--dtype", dtype,
                                               "--model", args.folder])
        plan = plan_run(evaluate.EVALUATE, flags)
        model, tok = load_model_and_tokenizer(plan)
        jobs = build_jobs(plan, tok, model.args.max_positions)
        base = None
        for batch_size in args.batch_sizes:
            tokens, start = 0, time.perf_counter()
            for batch in make_batches(jobs, batch_size):
                results = run_batch(model, batch, flags.max_new_tokens)
                tokens += sum(len(r["answers"][0]) for r in results)
            seconds = time.perf_counter() - start
            per_minute = len(jobs) / seconds * 60
            base = base or per_minute
            a = model.args
            entries = sum(r["turns"][0]["report"]["n_kept"] for r in results) / len(results) + flags.max_new_tokens
            row_mb = 2 * a.n_layers * a.n_kv_heads * a.head_dim * entries * model.dtype.itemsize / 2**20
            rows.append([dtype, batch_size, len(jobs), per_minute, tokens / seconds, per_minute / base, row_mb])
            out[f"{dtype}/{batch_size}"] = {"prompts_per_minute": per_minute, "tokens_per_s": tokens / seconds,
                                            "speedup": per_minute / base, "kv_mb_per_row": row_mb}
            print(f"  {dtype} batch {batch_size}: {per_minute:.1f} prompts/min", file=sys.stderr, flush=True)
    print_table(f"batch: the default evaluate.py workload (tova, ratios {args.batch_ratios}, "
                f"{args.batch_prompts} built-in prompts, 96 new tokens)",
                ["dtype", "batch", "jobs", "prompts/min", "tokens/s", "vs batch 1", "KV MB/row"], rows)
    return out


# ----------------------------------------------------------------------------- ragged

def bench_ragged(args) -> dict:
    """Decode tokens/s at batch 1 after compression, per allocation, and the KV bytes held.

    The system turn (about --ragged-length tokens of synthetic sentences) is prefilled and
    compressed once per variant (snapkv, r = 0.5; each allocation, and with --baseline the core
    of that git revision, uniform). Each of `repeats` rounds restores every variant's compressed
    cache and prefills the chat question, then times --new-tokens greedy decoding steps (one
    model forward of one token), interleaved step by step across the variants so that the
    machine's load falls on all of them alike; decode tok/s = 1 / the median step.
    uniform keeps every layer and head dense, so attention runs without a mask; pyramid gives
    layers different lengths (still no mask at batch 1); adakv's and global's heads hold different
    counts, so every layer attends through a mask per KV head: the difference is the cost of those masks.
    """
    tokenizer = load_tokenizer(args.folder)
    ours = this_tree()
    model = ours.load(args.folder)
    system, whole = tokenizer.chat_ids(synthetic_system_text(tokenizer, args.ragged_length), CHAT_USER)
    system_ids = torch.tensor([system.ids])                                              # (1, L)
    user_ids = torch.tensor([whole.ids[len(system.ids):]])                               # (1, T)
    variants = ragged_variants(args, ours, model, system_ids)
    steps = time_ragged_steps(variants, user_ids, args.repeats, min(args.new_tokens, 60))
    rows, out = [], {"system_len": system_ids.shape[1], "steps_per_round": min(args.new_tokens, 60), "runs": {}}
    base = None
    for name, (_, _, _, held, sized, kept) in variants.items():
        quartiles = statistics.quantiles(steps[name], n=4)
        speed = 1 / quartiles[1]
        base = base or speed
        rows.append([name, speed, speed / base, f"{1000 * quartiles[0]:.0f}-{1000 * quartiles[2]:.0f}",
                     held / 2**20, sized / 2**20, kept / 2**20])
        out["runs"][name] = {"decode_tok_s": speed, "vs_uniform": speed / base, "step_s_quartiles": quartiles,
                             "kv_bytes_held": held, "kv_bytes_sized": sized, "kv_bytes_kept": kept,
                             "step_s": steps[name]}
    print_table(f"ragged: decode after compression (snapkv, r = 0.5), batch 1, float32, system turn "
                f"{system_ids.shape[1]} tokens, {args.repeats} rounds x {out['steps_per_round']} steps, "
                "interleaved step by step",
                ["allocation", "decode tok/s", "vs uniform", "step ms IQR", "KV MB held", "KV MB sized",
                 "KV MB kept"], rows)
    print("KV MB held: the buffers (headroom included); sized: each layer as large as its largest head; "
          "kept: the entries kept")
    return out


def ragged_variants(args, ours: Code, model, system_ids: torch.Tensor) -> dict:
    """The system turn compressed (snapkv, r = 0.5) with each of our allocations, and with --baseline by that
    revision's core (uniform): name -> (model, cache, checkpoint, bytes held, sized, kept)."""
    entry_bytes = 2 * model.args.head_dim * model.dtype.itemsize                         # one key + value
    variants = {}                                        # name -> (model, cache, checkpoint, bytes held, sized, kept)
    versions = [(ours, model, allocation) for allocation in ours.policies.ALLOCATIONS]
    if args.baseline:
        base = load_baseline(args.baseline)
        versions.append((base, base.load(args.folder), "uniform"))
    for code, run_model, allocation in versions:
        cache, kept = code.compressed_cache(run_model, system_ids, code.spec("snapkv", 0.5, allocation))
        counts = torch.stack([k[0].sum(-1) for k in kept])                               # (n_layers, H_kv)
        sized = int(counts.max(1).values.sum()) * model.args.n_kv_heads * entry_bytes   # each layer: its largest head
        name = allocation if code is ours else f"{code.name} {allocation}"
        variants[name] = (run_model, cache, cache.checkpoint(), cache.nbytes(), sized, int(counts.sum()) * entry_bytes)
    return variants


def time_ragged_steps(variants: dict, user_ids: torch.Tensor, repeats: int, n_steps: int) -> dict:
    """Seconds of each decoding step per variant: every round restores its cache and prefills the question
    (untimed), then runs `n_steps` greedy steps, interleaved step by step across the variants."""
    steps = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(repeats):
            tokens = {}
            for name, (run_model, cache, saved, *_) in variants.items():
                cache.restore(saved)
                tokens[name] = run_model(user_ids, cache).argmax(-1)[:, None]           # the question, untimed
            for _ in range(n_steps):                                                    # within the headroom
                for name, (run_model, cache, *_) in variants.items():                   # interleaved, step by step
                    start = time.perf_counter()
                    tokens[name] = run_model(tokens[name], cache).argmax(-1)[:, None]
                    steps[name].append(time.perf_counter() - start)
    return steps


# ----------------------------------------------------------------------------- decoding

def bench_decoding(args) -> dict:
    """Decode tok/s and memory with and without compression during decoding, interleaved step by step.

    Both runs prefill the chat prompt, then decode --decoding-tokens tokens greedily without
    stopping; each step is one forward of one token, and for the compressed run its
    Cuts.after_forward (the cut itself, every --decoding-interval steps, is inside the timed step).
    Memory: the cache's buffers after every step (headroom included) and the most entries any KV
    head held right after a forward, before its cut.
    """
    from decoding import Cuts, Decoding
    from policies import Compression
    tokenizer = load_tokenizer(args.folder)
    model = this_tree().load(args.folder)
    prompt = torch.tensor([tokenizer.chat_ids(CHAT_SYSTEM, CHAT_USER)[1].ids])                  # (1, T)
    n = args.decoding_tokens
    if prompt.shape[1] + n > model.args.max_positions:
        raise SystemExit(f"--decoding-tokens {n}: the prompt plus answer exceed the model's context")
    spec = Decoding(Compression("knorm"), args.decoding_target, interval=args.decoding_interval)
    runs = {"off": None, f"knorm, target {spec.target}": spec}
    state = {}
    with torch.no_grad():
        for name, decoding in runs.items():
            state[name] = start_decoding_run(model, prompt, None if decoding is None else Cuts(decoding))
        for step in range(1, n):                                   # interleaved, step by step
            for name in runs:
                decoding_step(model, state[name], step, spec.interval)
        for run in state.values():
            if run["cuts"] is not None:
                run["cuts"].finish(run["cache"])
    rows, out = [], {"prompt_len": prompt.shape[1], "new_tokens": n, "runs": {}}
    for name, run in state.items():
        quartiles = statistics.quantiles(run["steps"], n=4)
        speed = (n - 1) / sum(run["steps"])
        rows.append([name, speed, 1 / quartiles[1], run["peak_entries"], run["peak_entries_after"],
                     run["peak_bytes"] / 2**20, run["peak_bytes_after"] / 2**20])
        out["runs"][name] = {"decode_tok_s": speed, "median_step_tok_s": 1 / quartiles[1],
                             "peak_entries_per_head": run["peak_entries"], "peak_cache_bytes": run["peak_bytes"],
                             "peak_entries_after_first_cut": run["peak_entries_after"],
                             "peak_cache_bytes_after_first_cut": run["peak_bytes_after"]}
    print_table(f"decoding: {n} greedy tokens after a {prompt.shape[1]}-token chat prompt, batch 1, float32, "
                f"interval {spec.interval}, interleaved step by step",
                ["compression during decoding", "decode tok/s", "median-step tok/s", "most entries per head",
                 "after 1st cut", "peak cache MB", "after 1st cut"], rows)
    print("entries: the most any KV head held right after a forward (before that step's cut); the first cut "
          "comes at step interval, so before it the cache holds the prompt + interval")
    return out


def start_decoding_run(model, prompt: torch.Tensor, cuts) -> dict:
    """One run's state after prefilling the prompt into a fresh cache (and starting its cuts, if any)."""
    cache = model.new_cache(capacity=prompt.shape[1] + 16)
    token = model(prompt, cache).argmax(-1)[:, None]
    if cuts is not None:
        cuts.start(cache)
    return dict(cache=cache, cuts=cuts, token=token, steps=[], peak_bytes=cache.nbytes(),
                peak_entries=0, peak_bytes_after=0, peak_entries_after=0)


def decoding_step(model, run: dict, step: int, interval: int):
    """One timed step of a run (a forward of its last token, then its cut, if due), and its peaks updated."""
    cache, cuts = run["cache"], run["cuts"]
    start = time.perf_counter()
    logits = model(run["token"], cache)
    entries = max(int(v[0, :, :m].sum(-1).max()) for v, m in zip(cache.valid, cache.lengths))
    if cuts is not None:
        cuts.after_forward(cache, step)
    run["steps"].append(time.perf_counter() - start)
    run["token"] = logits.argmax(-1)[:, None]
    run["peak_bytes"] = max(run["peak_bytes"], cache.nbytes())
    run["peak_entries"] = max(run["peak_entries"], entries)
    if step > interval:                                     # after the first cut
        run["peak_bytes_after"] = max(run["peak_bytes_after"], cache.nbytes())
        run["peak_entries_after"] = max(run["peak_entries_after"], entries)


def bench_window(args) -> dict:
    """The cache of a sliding-window model stays bounded by its window on a prompt several times longer.

    The default model with every layer given a sliding window of --window tokens (as Mistral's config
    sets it): a synthetic system turn of --window-length tokens is prefilled in chunks of --window
    tokens, then 64 tokens are decoded. Printed: the most entries any layer holds and the cache's bytes
    (headroom included) after the prefill and after decoding, with and without the window.
    """
    import dataclasses
    tokenizer = load_tokenizer(args.folder)
    model = this_tree().load(args.folder)
    ids = torch.tensor([synthetic_system_turn(tokenizer, args.window_length).ids])
    full_windows = model.args.windows
    rows, out = [], {"prompt_len": ids.shape[1], "window": args.window, "runs": {}}
    with torch.no_grad():
        for name, windows in (("no window", full_windows), (f"window {args.window}", [args.window] * model.args.n_layers)):
            model.args = dataclasses.replace(model.args, windows=windows)
            cache = model.new_cache(capacity=args.window)
            for start in range(0, ids.shape[1], args.window):               # chunked prefill
                token = model(ids[:, start:start + args.window], cache).argmax(-1)[:, None]
            after_prefill = (max(cache.lengths), cache.nbytes())
            for _ in range(64):
                token = model(token, cache).argmax(-1)[:, None]
            after_decode = (max(cache.lengths), cache.nbytes())
            rows.append([name, after_prefill[0], after_prefill[1] / 2**20, after_decode[0], after_decode[1] / 2**20])
            out["runs"][name] = {"slots_after_prefill": after_prefill[0], "bytes_after_prefill": after_prefill[1],
                                 "slots_after_decode": after_decode[0], "bytes_after_decode": after_decode[1]}
    model.args = dataclasses.replace(model.args, windows=full_windows)
    print_table(f"window: a {ids.shape[1]}-token system turn prefilled in chunks of {args.window}, then 64 decoded "
                f"tokens, batch 1, float32", ["attention", "slots per layer after prefill", "cache MB",
                                              "slots after decoding", "cache MB"], rows)
    print("slots: the most any layer holds (its buffer's filled length); a windowed layer forgets what no later "
          "query can see before it outgrows window + headroom")
    return out


# ----------------------------------------------------------------------------- main

SECTIONS = {"decode": bench_decode, "compress": bench_compress, "h2o-memory": bench_h2o_memory,
            "batch": bench_batch, "ragged": bench_ragged, "decoding": bench_decoding,
            "window": bench_window}
DEFAULT_SECTIONS = ["decode", "compress", "h2o-memory", "batch", "ragged"]


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line: the sections to run and each section's settings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated sections to run, from {', '.join(SECTIONS)} "
                             f"(default: {','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--folder", default=DEFAULT_FOLDER, help="checkpoint folder (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is "
                        "reported (default: %(default)s)")
    parser.add_argument("--baseline", metavar="REV", help="decode, compress, ragged: also time the core (model.py, "
                        "cache.py, policies.py, decoding.py) of this git revision, interleaved with ours, e.g. "
                        "de076ae (the commit before the redesign)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode: new tokens (default: %(default)s)")
    parser.add_argument("--decode-dtypes", default="float32,bfloat16", help="decode: dtypes (default: %(default)s)")
    parser.add_argument("--no-hf", action="store_true", help="decode: skip the Hugging Face comparison")
    parser.add_argument("--lengths", type=int_list, default=[100, 1000, 4000],
                        help="compress: approximate system-turn lengths (default: 100,1000,4000)")
    parser.add_argument("--memory-lengths", type=int_list, default=[1000, 4000],
                        help="h2o-memory: lengths L (default: 1000,4000)")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 4, 8, 16],
                        help="batch: batch sizes (default: 1,4,8,16)")
    parser.add_argument("--batch-prompts", type=int, default=16, help="batch: built-in prompts (default: %(default)s)")
    parser.add_argument("--batch-ratios", default="0.5", help="batch: ratios (default: %(default)s)")
    parser.add_argument("--batch-dtypes", default="float32,bfloat16", help="batch: dtypes (default: %(default)s)")
    parser.add_argument("--ragged-length", type=int, default=1000,
                        help="ragged: approximate system-turn length (default: %(default)s)")
    parser.add_argument("--decoding-tokens", type=int, default=2000,
                        help="decoding: greedy tokens per run (default: %(default)s)")
    parser.add_argument("--decoding-target", type=int, default=256,
                        help="decoding: entries per KV head after each cut (default: %(default)s)")
    parser.add_argument("--decoding-interval", type=int, default=16,
                        help="decoding: steps between cuts (default: %(default)s)")
    parser.add_argument("--window", type=int, default=256,
                        help="window: the sliding window given to every layer (default: %(default)s)")
    parser.add_argument("--window-length", type=int, default=2048,
                        help="window: approximate system-turn length (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice, "
                        "which OMP_NUM_THREADS sets)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--memory-probe", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> list[str]:
    """The sections to run, after checking the flags, the checkpoint and --baseline (loaded here)."""
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, not {args.repeats}")
    least = {"new_tokens": 2, "batch_prompts": 1, "ragged_length": 1, "decoding_tokens": 1, "decoding_target": 1,
             "decoding_interval": 1, "window": 1, "window_length": 1, "threads": 1}
    for name, low in least.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}, not {getattr(args, name)}")
    for flag in ("decode_dtypes", "batch_dtypes"):
        unknown = sorted(set(getattr(args, flag).split(",")) - set(DTYPES))
        if unknown:
            parser.error(f"--{flag.replace('_', '-')}: unknown dtype {unknown[0]!r} (choose from {', '.join(DTYPES)})")
    from flags import UsageError, parse_ratios
    try:
        parse_ratios(args.batch_ratios)
    except UsageError as error:
        parser.error(f"--batch-ratios: {error}")
    if args.json and (os.path.isdir(args.json) or not os.access(os.path.dirname(os.path.abspath(args.json)), os.W_OK)):
        parser.error(f"--json {args.json}: cannot write a file there (a folder, or a missing or read-only parent)")
    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        parser.error(f"no checkpoint in {args.folder}: run `python weights/prepare.py` (or `make weights`) first")
    if args.baseline:
        found = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", "--quiet", f"{args.baseline}^{{commit}}"],
                               capture_output=True, text=True)
        if found.returncode != 0:
            parser.error(f"--baseline {args.baseline}: not a commit of the git repository at {ROOT}")
        load_baseline(args.baseline)
    return sections


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.memory_probe:
        return memory_probe(args.folder, args.memory_probe[0], int(args.memory_probe[1]))
    sections = check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"nanokv bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"model {os.path.relpath(args.folder, ROOT)}, commit {_commit()}"
          + (f", baseline {args.baseline}" if args.baseline else ""))
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "folder": args.folder,
               "commit": _commit(), "baseline": args.baseline, "load_before": os.getloadavg()}
    for name in sections:
        start = time.perf_counter()
        results[name] = SECTIONS[name](args)
        print(f"({name}: {time.perf_counter() - start:.0f} s)")
    results["load_after"] = os.getloadavg()
    print("load average (1, 5, 15 min): before " + ", ".join(f"{x:.2f}" for x in results["load_before"])
          + "; after " + ", ".join(f"{x:.2f}" for x in results["load_after"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


def _commit() -> str:
    """This tree's commit, '+' when it has uncommitted changes to tracked files, or '?' outside git."""
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "?"
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+" if dirty else "")


if __name__ == "__main__":
    main()
