"""Benchmarks: decode speed (ours vs Hugging Face), the compress step's cost, H2O's memory.

    python3 bench.py                                   # every section, about 2-3 minutes on 2 cores
    python3 bench.py --only compress --lengths 100,1000
    python3 bench.py --only decode,h2o-memory --json out.json

Sections (each prints one plain table):
  decode      prefill and decode tokens/s at batch 1, float32 and bfloat16, on the default model;
              with transformers installed, the same for HF `generate` on the same folder, and ours/HF
  compress    what compression adds per policy, as a fraction of the system turn's prefill time:
              `cache.compress`, plus for H2O the prefill's extra time to sum its scores, for
              system turns of about 100, 1,000 and 4,000 tokens at ratio 0.5 (target: <= 10%)
  h2o-memory  peak extra memory of H2O's sums (in the prefill, or its own blockwise pass) vs the
              full L x L matrix
  batch       prompts per minute of the default evaluate.py workload at batch 1/4/8/16, float32
              and bfloat16, and KV-cache memory per row
  ragged      decode tokens/s at batch 1 after compressing a long system turn (snapkv, r = 0.5) with
              each allocation, and the KV bytes held; with --baseline REV also the code of git
              revision REV (e.g. the commit before ragged eviction), all interleaved in one run
  decoding    compression during decoding: --decoding-tokens greedy tokens (default 2,000) after the
              chat prompt at batch 1, float32, with the cache cut to --decoding-target entries per KV
              head (knorm, every 16 steps) and without; peak cache bytes, most entries per head, decode tok/s
              (several minutes: only with --only decoding)

Timings are medians of `--repeats` runs with the ours/HF (or policy) runs interleaved, since
the machine is shared and noisy. transformers is used only here, never by the project itself.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

import torch

from model import ModelArgs, generate, load_model, prefill
from policies import ALLOCATIONS, Compression, Decoding, Layer, attention_with_received, h2o
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FOLDER = os.path.join(ROOT, "weights", "smollm2-135m-instruct")
POLICY_NAMES = ("streaming_llm", "h2o", "knorm", "snapkv", "tova")
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


# ----------------------------------------------------------------------------- decode

def bench_decode(args) -> dict:
    """Prefill and decode tokens/s at batch 1, greedy, no stop, ours and (if installed) HF's.

    prefill tok/s = prompt tokens / time of one forward over the prompt into an empty cache.
    decode tok/s  = (N - 1) / (time of generating N tokens - time of generating 1 token): the
    tokens produced after the first one, over the time after the first one. Both sides are
    timed with the same method through their own `generate`, so setup costs cancel.
    """
    tokenizer = load_tokenizer(args.folder)
    ids = torch.tensor([tokenizer.chat_ids(CHAT_SYSTEM, CHAT_USER)[1].ids])               # (1, T)
    n_new = args.new_tokens
    hf_available = _transformers_available() and not args.no_hf
    rows, results = [], {"prompt_tokens": ids.shape[1], "new_tokens": n_new, "runs": {}}
    for dtype in ("float32", "bfloat16"):
        model = load_model(args.folder, dtype=dtype)
        runners = {"ours": _our_runner(model, ids)}
        if hf_available:
            runners["hf"] = _hf_runner(args.folder, dtype, ids)
        for runner in runners.values():                                                  # warm up
            runner["generate"](2)
        times = {name: {"prefill": [], "one": [], "all": []} for name in runners}
        for _ in range(args.repeats):                                                    # interleaved
            for name, runner in runners.items():
                times[name]["prefill"].append(timed(runner["prefill"]))
                times[name]["one"].append(timed(lambda: runner["generate"](1)))
                times[name]["all"].append(timed(lambda: runner["generate"](n_new)))
        tokens = {name: runner["generate"](n_new) for name, runner in runners.items()}
        speeds = {}
        for name, t in times.items():
            prefill_s, one_s, all_s = (statistics.median(t[k]) for k in ("prefill", "one", "all"))
            speeds[name] = {"prefill_tok_s": ids.shape[1] / prefill_s,
                            "decode_tok_s": (n_new - 1) / (all_s - one_s),
                            "prefill_s": prefill_s, "generate_1_s": one_s, f"generate_{n_new}_s": all_s}
            assert len(tokens[name]) == n_new, f"{name} produced {len(tokens[name])} tokens, not {n_new}"
        row = [dtype, speeds["ours"]["prefill_tok_s"], speeds["ours"]["decode_tok_s"]]
        if "hf" in speeds:
            same = _same_prefix(tokens["ours"], tokens["hf"])
            row += [speeds["hf"]["prefill_tok_s"], speeds["hf"]["decode_tok_s"],
                    speeds["ours"]["prefill_tok_s"] / speeds["hf"]["prefill_tok_s"],
                    speeds["ours"]["decode_tok_s"] / speeds["hf"]["decode_tok_s"], f"{same}/{n_new}"]
            speeds["same_tokens"] = same
        rows.append(row)
        results["runs"][dtype] = speeds
        del runners, model
    header = ["dtype", "ours prefill tok/s", "ours decode tok/s"]
    if hf_available:
        header += ["HF prefill tok/s", "HF decode tok/s", "prefill ours/HF", "decode ours/HF", "same tokens"]
    print_table(f"decode: batch 1, greedy, prompt {ids.shape[1]} tokens, {n_new} new tokens, "
                f"median of {args.repeats}", header, rows)
    if not hf_available:
        print("(transformers not importable or --no-hf: no HF comparison)")
    return results


def _our_runner(model, ids):
    return {
        "prefill": lambda: prefill(model, model.new_cache(), ids),
        "generate": lambda n: generate(model, model.new_cache(), ids, n, stop_ids=[])[0],
    }


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


def synthetic_system_turn(tokenizer, target_len: int, seed: int = 0) -> list[int]:
    """Ids of a chat-templated system turn of about `target_len` tokens of varied synthetic sentences."""
    messages = [{"role": "system", "content": synthetic_system_text(tokenizer, target_len, seed)}]
    return tokenizer.encode_chat(messages, add_generation_prompt=False).ids


def bench_compress(args) -> dict:
    """What compression adds to the system turn's prefill, per policy, as a fraction of it.

    The base is the protocol's prefill: a fresh cache with record_queries on. For every policy
    but H2O the cost is the time of cache.compress (all layers: score, select, gather). H2O
    takes its sums from the prefill (record_received, as run_batch does), so its cost is the
    extra time of that prefill plus its compress. "h2o own pass" is H2O scoring without them
    (h2o's blockwise pass, which fair eviction uses). Prefills with and without the sums are
    timed interleaved, `repeats` times each; each compress runs on a copy of one recorded cache.

    A whole prefill varies by several percent from run to run on a shared machine, so the
    sums' cost is also measured where it arises, with less noise: one layer's attention with
    the model's shapes, flash (SDPA) vs attention_with_received, interleaved, 5 x `repeats`
    times; the difference times the number of layers, over the prefill, is "h2o (attention)".
    """
    tokenizer = load_tokenizer(args.folder)
    model = load_model(args.folder)
    rows, results = [], {}
    prefill(model, model.new_cache(), torch.tensor([synthetic_system_turn(tokenizer, 100)]))  # warm up
    for target in args.lengths:
        ids = torch.tensor([synthetic_system_turn(tokenizer, target)])                  # (1, L)
        L = ids.shape[1]

        def recorded_prefill(received: bool):
            cache = model.new_cache(capacity=L + 64)
            cache.prepare([Compression("h2o" if received else "snapkv", 0.5)])   # h2o: its observer sums
            prefill(model, cache, ids)
            return cache

        times = {False: [], True: []}
        for _ in range(args.repeats):                                                   # interleaved
            for received in times:
                times[received].append(timed(lambda: recorded_prefill(received)))
        prefill_s, received_s = statistics.median(times[False]), statistics.median(times[True])
        recorded = {received: recorded_prefill(received) for received in times}
        runs = [(name, name != "h2o") for name in POLICY_NAMES] + [("h2o", True)]       # (policy, own pass)
        compress_s = {run: [] for run in runs}
        for _ in range(args.repeats):                                                   # interleaved
            for name, own_pass in runs:
                cache = copy.deepcopy(recorded[not own_pass])
                compress_s[(name, own_pass)].append(timed(lambda: cache.compress(Compression(name, ratio=0.5))))
                del cache
        medians = {run: statistics.median(t) for run, t in compress_s.items()}
        cost = {name: medians[(name, True)] for name in POLICY_NAMES if name != "h2o"}
        cost["h2o"] = received_s - prefill_s + medians[("h2o", False)]
        cost["h2o own pass"] = medians[("h2o", True)]
        flash_s, sums_s = attention_times(model.args, L, 5 * args.repeats)
        cost["h2o (attention)"] = model.args.n_layers * (sums_s - flash_s) + medians[("h2o", False)]
        fraction = {name: c / prefill_s for name, c in cost.items()}
        rows.append([L, 1000 * prefill_s] + [f"{100 * fraction[name]:.1f}%" for name in cost]
                    + [1000 * (received_s - prefill_s), 1000 * flash_s, 1000 * sums_s, 1000 * medians[("h2o", False)]])
        results[str(L)] = {"prefill_s": prefill_s, "prefill_with_received_s": received_s,
                           "layer_attention_s": {"flash": flash_s, "with_sums": sums_s},
                           "cost_s": cost, "fraction": fraction}
    names = [n for n in POLICY_NAMES if n != "h2o"] + ["h2o", "h2o own pass", "h2o (attention)"]
    print_table(f"compress: what compression (ratio 0.5) adds to the system prefill, all {model.args.n_layers} "
                f"layers, median of {args.repeats} (target <= 10% at L >= 1000); h2o = the prefill's "
                "extra time for its sums + its compress",
                ["L", "prefill ms"] + names + ["h2o sums in prefill ms", "layer flash ms", "layer with sums ms",
                                               "h2o compress ms"], rows)
    over = [f"{name} at L={L} ({100 * r['fraction'][name]:.1f}%)" for L, r in results.items() if int(L) >= 1000
            for name in POLICY_NAMES if r["fraction"][name] > 0.10]
    print("over the 10% target: " + (", ".join(over) if over else "none"))
    return results


def attention_times(shape: ModelArgs, L: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one layer's causal attention over L tokens: flash (SDPA) and with H2O's sums."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, shape.n_heads, L, shape.head_dim, generator=gen)
    k, v = (torch.randn(1, shape.n_kv_heads, L, shape.head_dim, generator=gen) for _ in range(2))
    scratch = {}                                             # as the cache lends it from layer to layer
    runs = {"flash": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            "sums": lambda: attention_with_received(q, k, v, None, scratch=scratch)}
    times = {name: [] for name in runs}
    for name, run in runs.items():
        run()                                                # warm up
    for _ in range(repeats):                                 # interleaved
        for name, run in runs.items():
            times[name].append(timed(run))
    return statistics.median(times["flash"]), statistics.median(times["sums"])


# ----------------------------------------------------------------------------- h2o-memory

def bench_h2o_memory(args) -> dict:
    """Peak extra memory of H2O's sums for one layer: in the prefill, in its own pass, as a full matrix.

    analytic: bytes of the largest intermediates alive at once, float32.
      in prefill: model.attention_with_received (block 64): a block's logits and probabilities,
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
    shape = model_shape(folder)
    score = {"in prefill": lambda q, k: attention_with_received(q, k, k, None),
             "own pass": lambda q, k: h2o(q, k, k, [(0, q.shape[2])], Layer(0, 1)), "full": full_matrix_h2o}[method]
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
            entries = sum(r["report"]["n_kept"] for r in results) / len(results) + flags.max_new_tokens
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
    compressed once per variant (snapkv, r = 0.5; uniform, pyramid, adakv, and with --baseline
    the code of that git revision). Each of `repeats` rounds restores every variant's compressed
    cache and prefills the chat question, then times --new-tokens greedy decoding steps (one
    model forward of one token), interleaved step by step across the variants so that the
    machine's load falls on all of them alike; decode tok/s = 1 / the median step.
    uniform keeps every layer and head dense, so attention runs without a mask; pyramid gives
    layers different lengths (still no mask at batch 1); adakv's heads hold different counts,
    so every layer attends through a mask per KV head: the difference is the cost of those masks.
    """
    tokenizer = load_tokenizer(args.folder)
    model = load_model(args.folder)
    system, whole = tokenizer.chat_ids(synthetic_system_text(tokenizer, args.ragged_length), CHAT_USER)
    system_ids = torch.tensor([system.ids])                                              # (1, L)
    user_ids = torch.tensor([whole.ids[len(system.ids):]])                               # (1, T)
    entry_bytes = 2 * model.args.head_dim * model.dtype.itemsize                         # one key + value
    variants = {}                                        # name -> (model, cache, checkpoint, bytes held, sized, kept)
    for allocation in ALLOCATIONS:
        spec = Compression("snapkv", 0.5, allocation=allocation)
        cache = model.new_cache(capacity=system_ids.shape[1])
        cache.prepare([spec])
        prefill(model, cache, system_ids)
        report = cache.compress([spec])[0]
        kept = sum(int(k.sum()) for k in cache.kept) * entry_bytes
        variants[allocation] = (model, cache, cache.checkpoint(), cache.nbytes(), report["kv_bytes"], kept)
    if args.baseline:
        old = load_baseline(args.baseline)
        old_model = old["model"].load_model(args.folder)
        cache = old_model.new_cache(capacity=system_ids.shape[1])
        cache.record_queries = True
        prefill(old_model, cache, system_ids)
        cache.compress(old["policies"].Compression("snapkv", 0.5))
        held = sum(k.nbytes + v.nbytes for k, v in zip(cache.keys, cache.values))
        kept = sum(int(k.sum()) for k in cache.kept) * entry_bytes
        variants[f"baseline {args.baseline}"] = (old_model, cache, cache.checkpoint(), held, kept, kept)

    steps = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(args.repeats):
            tokens = {}
            for name, (run_model, cache, saved, *_) in variants.items():
                cache.restore(saved)
                tokens[name] = run_model(user_ids, cache).argmax(-1)[:, None]           # the question, untimed
            for _ in range(min(args.new_tokens, 60)):                                   # within the headroom
                for name, (run_model, cache, *_) in variants.items():                   # interleaved, step by step
                    start = time.perf_counter()
                    tokens[name] = run_model(tokens[name], cache).argmax(-1)[:, None]
                    steps[name].append(time.perf_counter() - start)
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


def bench_decoding(args) -> dict:
    """Decode tok/s and memory with and without compression during decoding, interleaved step by step.

    Both runs prefill the chat prompt, then decode --decoding-tokens tokens greedily without
    stopping; each step is one forward of one token, and for the compressed run its cut_due
    (the cut itself, every --decoding-interval steps, is inside the timed step). Memory: the
    cache's buffers after every step (headroom included) and the most entries any KV head held
    right after a forward, before its cut.
    """
    tokenizer = load_tokenizer(args.folder)
    model = load_model(args.folder)
    prompt = torch.tensor([tokenizer.chat_ids(CHAT_SYSTEM, CHAT_USER)[1].ids])                  # (1, T)
    n = args.decoding_tokens
    if prompt.shape[1] + n > model.args.max_positions:
        raise SystemExit(f"--decoding-tokens {n}: the prompt plus answer exceed the model's context")
    spec = Decoding("knorm", args.decoding_target, interval=args.decoding_interval)
    runs = {"off": None, f"knorm, target {spec.target}": spec}
    state = {}
    with torch.no_grad():
        for name, decoding in runs.items():
            cache = model.new_cache(capacity=prompt.shape[1] + 16)
            token = model(prompt, cache).argmax(-1)[:, None]
            if decoding is not None:
                cache.start_decoding([decoding])
            state[name] = dict(cache=cache, token=token, steps=[], peak_bytes=cache.nbytes(), peak_entries=0,
                               peak_bytes_after=0, peak_entries_after=0)
        for step in range(1, n):                                   # interleaved, step by step
            for name, decoding in runs.items():
                run = state[name]
                cache = run["cache"]
                start = time.perf_counter()
                logits = model(run["token"], cache)
                entries = max(int(v[0, :, :m].sum(-1).max()) for v, m in zip(cache.valid, cache.lengths))
                if decoding is not None:
                    cache.cut_due(step)
                run["steps"].append(time.perf_counter() - start)
                run["token"] = logits.argmax(-1)[:, None]
                run["peak_bytes"] = max(run["peak_bytes"], cache.nbytes())
                run["peak_entries"] = max(run["peak_entries"], entries)
                if step > spec.interval:                            # after the first cut
                    run["peak_bytes_after"] = max(run["peak_bytes_after"], cache.nbytes())
                    run["peak_entries_after"] = max(run["peak_entries_after"], entries)
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


def load_baseline(revision: str) -> dict:
    """model.py, cache.py and policies.py of a git revision, imported as separate modules (for `ragged`)."""
    import importlib.util
    import tempfile
    folder = tempfile.mkdtemp(prefix="nanokv-baseline-")
    modules = {}
    for name in ("policies", "cache", "model"):                                          # dependency order
        source = subprocess.run(["git", "-C", ROOT, "show", f"{revision}:{name}.py"], capture_output=True,
                                text=True, check=True).stdout
        source = source.replace("from cache import", "from baseline_cache import")
        source = source.replace("from policies import", "from baseline_policies import")
        path = os.path.join(folder, f"baseline_{name}.py")
        with open(path, "w") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
        modules[name] = sys.modules[f"baseline_{name}"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    return modules


# ----------------------------------------------------------------------------- main

SECTIONS = {"decode": bench_decode, "compress": bench_compress, "h2o-memory": bench_h2o_memory,
            "batch": bench_batch, "ragged": bench_ragged, "decoding": bench_decoding}
DEFAULT_SECTIONS = ["decode", "compress", "h2o-memory", "batch", "ragged"]


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated sections to run, from {', '.join(SECTIONS)} "
                             f"(default: {','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--folder", default=DEFAULT_FOLDER, help="checkpoint folder (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is "
                        "reported (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode: new tokens (default: %(default)s)")
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
    parser.add_argument("--baseline", metavar="REV", help="ragged: also time the model, cache and policies "
                        "of this git revision, e.g. the commit before ragged eviction")
    parser.add_argument("--decoding-tokens", type=int, default=2000,
                        help="decoding: greedy tokens per run (default: %(default)s)")
    parser.add_argument("--decoding-target", type=int, default=256,
                        help="decoding: entries per KV head after each cut (default: %(default)s)")
    parser.add_argument("--decoding-interval", type=int, default=16,
                        help="decoding: steps between cuts (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--memory-probe", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args.folder, args.memory_probe[0], int(args.memory_probe[1]))

    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        parser.error(f"no checkpoint in {args.folder}: run `python3 weights/prepare.py` first")
    print(f"nanokv bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"model {os.path.relpath(args.folder, ROOT)}")
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "folder": args.folder}
    for name in sections:
        start = time.perf_counter()
        results[name] = SECTIONS[name](args)
        print(f"({name}: {time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
