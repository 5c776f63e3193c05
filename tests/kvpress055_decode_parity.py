"""Parity of nanokv's compression during decoding with NVIDIA kvpress 0.5.5 `DecodingPress`.

On the real default model and the paper's prompts (the system turn built with the standard defense,
then the user turn with the generation prompt), greedy, 48 new tokens, no stop id, generate with

    knorm          <->  DecodingPress(KnormPress(), ...)
    tova           <->  DecodingPress(TOVAPress(), ...)
    streaming_llm  <->  DecodingPress(StreamingLLMPress(n_sink=4), ...)

all with compression_interval=16, target_size=128, hidden_states_buffer_size=16, and compare the
generated tokens and, after every cut, the positions each (layer, KV head) keeps.

kvpress runs on Hugging Face `LlamaForCausalLM` (float32, sdpa), driven the way kvpress's pipeline
drives it (`KVPressTextGenerationPipeline.generate_answer`): the prompt is prefilled without the press
(positions 0..L-1; a DecodingPress does nothing during a prefill anyway), the first token is the
argmax of the prefill's last logits, then under `press(model)` one token per forward with explicit
`position_ids` L, L+1, ... (48 new tokens: 47 decode forwards). The whole prompt is the pipeline's
"context" here; the pipeline would otherwise run the question as one more multi-token forward under
the press, which DecodingPress counts as a decode step (see "kvpress's schedule" below). nanokv and
kvpress get the same token ids (nanokv's chat template, checked against HF `apply_chat_template`).

What kvpress keeps is read from what it did: `DecodingPress.compress` is wrapped, the base press's
`score` recorded, and the `topk` indices ScorerPress gathered recomputed on the same scores (checked
against the keys kvpress gathered). kvpress gathers the cache in score order, so its rows are no
longer in position order after a cut: the script keeps, per layer and KV head, the original position
of every cache row (the prompt's rows, then each decode token's row as the forward appends it) and
composes it with each cut's gather, so kept sets are compared in original positions.

kvpress's schedule (DecodingPress.forward_hook, 0.5.5), as measured here:
- a forward is "decoding" unless cache_position[-1] + 1 == q_len, so every forward after the prefill
  counts, whatever its length; each layer counts its own decode forwards and cuts on the forward
  where the count reaches compression_interval (16, 32, ...: 2 cuts in 47 forwards), after that
  layer's attention, so the forward's own output still used the whole cache;
- the cut scores the layer's whole cache, the current token's key included, and keeps target_size
  rows per KV head (the ratio is found by bisection so int(n * (1 - ratio)) == target); when the
  cache holds <= target_size rows the ratio is 0 and ScorerPress returns it unchanged, but the count
  and buffer are still reset;
- the buffer holds the attention inputs of the decode forwards since the last cut (16 at a cut with
  interval 16, buffer 16; with interval > buffer it would hold buffer + 1). It is trimmed by
  forwards, not tokens: in the pipeline a 5-token question forward followed by 15 one-token forwards
  makes the first cut, with 20 buffered tokens (measured);
- KnormPress scores -||k|| of every row: the current token is not protected and can be evicted;
- TOVAPress (no attention weights with sdpa) recomputes the current token's query from the last
  buffered hidden state with the current forward's rotary angles, softmax over the whole cache
  (current key included), drops the current key's column, averages over all query heads (the same
  scores for every KV head) and pads the current token with max + 1, so it is always kept;
- StreamingLLMPress scores cache ROWS: 1, but 0 for rows n_sink .. n_sink + n_pruned - 1. On the
  first cut rows are still in position order (sinks + the most recent); after it they are in the
  previous cut's topk order, so later cuts drop whatever rows sit there, not the oldest positions.

Where the kept sets of a (prompt, cut, layer, KV head) differ, the differing positions that both
sides could choose from (kept by both before this cut, or new since) are compared with kvpress's
score at its cut (the target-th largest), relative gap:
    exact ties   == 0: both selections are a valid choice among equal scores (K-norm's layer 0: the
                 same token at two positions has the same key norm)
    ties         <= 1e-6: float32 rounding of the same scores
    inherited    every differing position had already been evicted by one side at an earlier cut of
                 this head, where that cut differed by a tie
    REAL         anything else; the script then exits 1.
Cuts at or after the first differing generated token are not compared (their inputs differ). For
streaming_llm only the first cut is checked; the later ones are reported (the older positions kvpress keeps
and the recent ones it drops) and nanokv's are checked to be the n_sink first
positions and the most recent ones.

Environment (kvpress 0.5.5 with transformers 5.x in its own venv, outside the project): see
tests/kvpress055_parity.py. Run from the repository root (needs weights/smollm2-135m-instruct and
../shared/data/paper):

    ../kvpress055/bin/python tests/kvpress055_decode_parity.py                   # 10 prompts
    ../kvpress055/bin/python tests/kvpress055_decode_parity.py --prompts 2 --policies knorm
    ../kvpress055/bin/python -m pytest -q tests/test_kvpress055_decode_parity.py
"""
from __future__ import annotations

import argparse
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

DEFAULT_MODEL = ROOT / "weights" / "smollm2-135m-instruct"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "paper"
POLICIES = ("knorm", "tova", "streaming_llm")
TARGET, INTERVAL, BUFFER, NEW_TOKENS, N_SINK = 128, 16, 16, 48, 4
TIE_TOL = 1e-6


# ----------------------------------------------------------------------------- inputs

def paper_prompts(data_dir: Path, folder: Path, n: int) -> list[tuple[str, list[int]]]:
    """(key, ids) of the first n shuffled prompts: system turn (standard defense) + user turn + generation
    prompt, nanokv's ids, checked against HF apply_chat_template's."""
    from transformers import AutoTokenizer

    records = nk_prompts.load_sys_ifeval(data_dir / "sys_ifeval_shuffled.jsonl")[:n]
    defense = nk_prompts.load_defenses(data_dir / "defense_template.json")["standard_defense"]
    ours, hf = nk_tokenizer.load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    out = []
    for p in records:
        system = nk_prompts.build_system_message(p, defense).text
        ids = ours.chat_ids(system, p.task)[1].ids
        hf_ids = hf.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": p.task}],
                                        tokenize=True, add_generation_prompt=True)
        if hasattr(hf_ids, "keys"):                        # transformers >= 5 returns a BatchEncoding
            hf_ids = hf_ids["input_ids"]
        if list(hf_ids) != list(ids):
            raise SystemExit(f"prompt {p.key}: nanokv's prompt ids differ from HF apply_chat_template's")
        out.append((p.key, ids))
    return out


# ----------------------------------------------------------------------------- kvpress side

def make_press(policy: str, target: int = TARGET, interval: int = INTERVAL, buffer: int = BUFFER):
    import kvpress
    base = {"knorm": lambda: kvpress.KnormPress(), "tova": lambda: kvpress.TOVAPress(),
            "streaming_llm": lambda: kvpress.StreamingLLMPress(n_sink=N_SINK)}[policy]()
    return kvpress.DecodingPress(base_press=base, compression_interval=interval, target_size=target,
                                 hidden_states_buffer_size=buffer)


def kvpress_generate(hf_model, ids: list[int], policy: str, max_new_tokens: int = NEW_TOKENS,
                     target: int = TARGET, interval: int = INTERVAL, buffer: int = BUFFER) -> dict:
    """Greedy generation under DecodingPress, as kvpress's pipeline drives it. Returns
    tokens  the max_new_tokens generated ids
    cuts    one dict per cut, in the order they happened: layer, step (1-based decode forward),
            rows (H_kv, n) the original position of each cache row before the cut, scores (H_kv, n)
            the base press's scores of those rows (None when the cache was not over target), kept
            (H_kv lists of sorted original positions), buffered (hidden states the press scored with)
    """
    from transformers import DynamicCache

    press = make_press(policy, target, interval, buffer)
    n_layers, h_kv = hf_model.config.num_hidden_layers, hf_model.config.num_key_value_heads
    L = len(ids)
    rows = [torch.arange(L).expand(h_kv, L) for _ in range(n_layers)]      # (H_kv, n) per layer
    state = {"step": 0, "scores": None}
    cuts = []
    score_fn, compress_fn = press.base_press.score, press.compress

    def score(module, hidden_states, keys, values, attentions, kwargs):
        s = score_fn(module, hidden_states, keys, values, attentions, kwargs)
        state["scores"] = s.detach().clone()
        return s

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        layer = module.layer_idx
        state["scores"] = None
        new_keys, new_values = compress_fn(module, hidden_states, keys, values, attentions, kwargs)
        before = rows[layer]
        assert before.shape[1] == keys.shape[2], "lost track of the cache's rows"
        scores = state["scores"]
        if scores is None:                                   # cache <= target: kvpress leaves it as it is
            assert new_keys is keys and keys.shape[2] <= target
            index = torch.arange(keys.shape[2]).expand(1, h_kv, -1)
        else:
            assert new_keys.shape[2] == target, (new_keys.shape, target)
            index = scores.topk(target, dim=-1).indices                # the call ScorerPress made
            gathered = keys.gather(2, index[..., None].expand(-1, -1, -1, keys.shape[-1]))
            assert torch.equal(gathered, new_keys), "recorded indices are not the ones kvpress gathered"
        rows[layer] = before.gather(1, index[0])                         # original positions, kvpress's row order
        cuts.append(dict(layer=layer, step=state["step"], rows=before,
                         scores=None if scores is None else scores[0].float(),
                         kept=[sorted(r) for r in rows[layer].tolist()], buffered=hidden_states.shape[1]))
        return new_keys, new_values

    press.base_press.score = score
    press.compress = compress
    cache = DynamicCache()
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids]), past_key_values=cache, logits_to_keep=1).logits
        tokens = [int(logits[0, -1].argmax())]
        with press(hf_model):
            for i in range(max_new_tokens - 1):
                position = L + i
                state["step"] = i + 1
                for layer in range(n_layers):            # the forward appends this token's row to every layer
                    rows[layer] = torch.cat([rows[layer], torch.full((h_kv, 1), position)], dim=1)
                logits = hf_model(torch.tensor([[tokens[-1]]]), past_key_values=cache,
                                  position_ids=torch.tensor([[position]])).logits
                tokens.append(int(logits[0, -1].argmax()))
                for layer in range(n_layers):
                    assert cache.layers[layer].keys.shape[2] == rows[layer].shape[1]
    return dict(tokens=tokens, cuts=cuts, length=L)


# ----------------------------------------------------------------------------- nanokv side

def nanokv_generate(ours_model, ids: list[int], policy: str, max_new_tokens: int = NEW_TOKENS,
                    target: int = TARGET, interval: int = INTERVAL, buffer: int = BUFFER) -> dict:
    """nanokv's greedy generation with decode-time compression. Returns tokens and cuts (layer, step, kept:
    H_kv lists of sorted original positions), in the format of kvpress_generate (without rows/scores)."""
    from decoding import Cuts, Decoding
    from policies import Compression

    options = {"n_sink": N_SINK} if policy == "streaming_llm" else {}
    cache = ours_model.new_cache(1, capacity=len(ids) + max_new_tokens)
    cuts = Cuts(Decoding(Compression(policy, options=options), target, interval=interval, buffer=buffer), log=True)
    with torch.no_grad():
        answers = nk_model.generate(ours_model, cache, torch.tensor([ids]), max_new_tokens, stop_ids=(), cuts=cuts)
    cuts = [dict(layer=c["layer"], step=c["step"], kept=[sorted(h) for h in c["kept"][0]]) for c in cuts.log]
    return dict(tokens=list(answers[0]), cuts=cuts, length=len(ids))


# ----------------------------------------------------------------------------- comparison

@dataclass
class Tally:
    prompts: int = 0
    tokens_identical: int = 0      # prompts whose generated tokens are all identical
    first_token_diffs: list = field(default_factory=list)   # (prompt, 0-based index of the first differing token)
    schedule_diffs: int = 0        # (layer, step) cuts made by one side only
    heads: int = 0                 # (prompt, cut, layer, KV head) kept sets compared
    identical: int = 0
    exact_ties: int = 0            # differ only at positions whose kvpress score equals its cut exactly
    ties: int = 0                  # ... within TIE_TOL
    inherited: int = 0             # differ only at positions one side had evicted at an earlier tie
    real: int = 0
    not_compared: int = 0          # heads of cuts whose inputs differ (at or after the first differing token)
    later_cuts: int = 0            # streaming_llm: heads of cuts after the first (reported, not compared)
    later_differ: int = 0          # ... where kvpress keeps other positions than n_sink first + most recent
    later_nanokv_wrong: int = 0    # ... where nanokv does not keep the n_sink first and the most recent positions
    layers_with_ties: set = field(default_factory=set)
    examples: list = field(default_factory=list)
    later_examples: list = field(default_factory=list)

    def verdicts(self) -> dict:
        return {k: getattr(self, k) for k in ("identical", "exact_ties", "ties", "inherited", "real")}


def ranges(positions) -> str:
    """'96-124, 130' for a sorted list of ints."""
    out, run = [], []
    for p in sorted(positions):
        if run and p != run[-1] + 1:
            out.append(run)
            run = []
        run.append(p)
    if run:
        out.append(run)
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in out) or "-"


def streaming_expected(length: int, step: int, target: int = TARGET, n_sink: int = N_SINK) -> list[int]:
    """StreamingLLM in original positions: the n_sink first positions and the most recent ones, at a cut
    after decode forward `step` (the cache then holds positions 0 .. length + step - 1)."""
    end = length + step
    return list(range(n_sink)) + list(range(end - (target - n_sink), end))


def classify(ours: set, theirs: set, ours_candidates: set, rows: torch.Tensor, scores: torch.Tensor | None,
             had_tie: bool) -> tuple[str, list, float]:
    """One head at one cut: (verdict, differing positions, largest relative gap to kvpress's cut score)."""
    diff = sorted(ours ^ theirs)
    if not diff:
        return "identical", diff, 0.0
    if scores is None or len(ours) != len(theirs):            # kvpress did not cut, or kept another count
        return "real", diff, float("inf")
    score_of = dict(zip(rows.tolist(), scores.tolist()))
    cut = min(score_of[p] for p in theirs)                    # the target-th largest kvpress score
    scored = [p for p in diff if p in score_of and p in ours_candidates]
    inherited = len(scored) < len(diff)
    gap = max((abs(score_of[p] - cut) / max(abs(cut), 1e-30) for p in scored), default=0.0)
    if gap > TIE_TOL or (inherited and not had_tie):
        return "real", diff, gap
    if gap > 0:
        return "ties", diff, gap
    return ("exact_ties" if scored else "inherited"), diff, gap


def compare(tally: Tally, theirs: dict, ours: dict, policy: str, key: str):
    """Add one prompt's comparison (kvpress_generate's and nanokv_generate's results) to the tally."""
    tally.prompts += 1
    L = theirs["length"]
    a, b = theirs["tokens"], ours["tokens"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    if first is None:
        tally.tokens_identical += 1
    else:
        tally.first_token_diffs.append((key, first))
    # a cut at decode forward `step` has read the tokens up to index step - 1
    usable = len(a) if first is None else first
    theirs_at = {(c["layer"], c["step"]): c for c in theirs["cuts"]}
    ours_at = {(c["layer"], c["step"]): c for c in ours["cuts"]}
    for where in sorted(set(theirs_at) ^ set(ours_at)):
        if where[1] <= usable:
            tally.schedule_diffs += 1
            if len(tally.examples) < 5:
                tally.examples.append(dict(prompt=key, layer=where[0], step=where[1],
                                           verdict="cut by " + ("kvpress" if where in theirs_at else "nanokv") + " only"))
    ours_before: dict[int, list[set]] = {}                    # layer -> per head: nanokv's kept after its last cut
    had_tie: dict[tuple[int, int], bool] = {}
    first_step = {}
    for layer, step in sorted(theirs_at, key=lambda w: (w[1], w[0])):
        first_step.setdefault(layer, step)
    for (layer, step) in sorted(set(theirs_at) & set(ours_at), key=lambda w: (w[1], w[0])):
        t, o = theirs_at[(layer, step)], ours_at[(layer, step)]
        n_heads = len(t["kept"])
        later = policy == "streaming_llm" and step != first_step[layer]
        for h in range(n_heads):
            mine, kv = set(o["kept"][h]), set(t["kept"][h])
            if later:
                tally.later_cuts += 1
                expected = set(streaming_expected(L, step))
                tally.later_nanokv_wrong += int(mine != expected)
                if kv != expected:
                    tally.later_differ += 1
                    if len(tally.later_examples) < 3 and h == 0:
                        tally.later_examples.append(dict(prompt=key, layer=layer, step=step, head=h,
                                                         kvpress_keeps=ranges(kv - expected),
                                                         kvpress_drops=ranges(expected - kv)))
                continue
            if step > usable:
                tally.not_compared += 1
                continue
            prev = ours_before.get(layer)
            new = set(range(L + step - INTERVAL, L + step)) if prev is not None else set()
            candidates = (prev[h] | new) if prev is not None else set(range(L + step))
            verdict, diff, gap = classify(mine, kv, candidates, t["rows"][h], None if t["scores"] is None
                                          else t["scores"][h], had_tie.get((layer, h), False))
            tally.heads += 1
            setattr(tally, verdict, getattr(tally, verdict) + 1)
            if verdict in ("exact_ties", "ties"):
                had_tie[(layer, h)] = True
                tally.layers_with_ties.add(layer)
            if verdict == "real" and len(tally.examples) < 5:
                tally.examples.append(dict(prompt=key, layer=layer, step=step, head=h, verdict=verdict,
                                           nanokv_only=sorted(mine - kv), kvpress_only=sorted(kv - mine), gap=gap))
        ours_before[layer] = [set(k) for k in o["kept"]]


# ----------------------------------------------------------------------------- the whole check

def run(n_prompts: int = 10, policies=POLICIES, folder: Path = DEFAULT_MODEL, data_dir: Path = DEFAULT_DATA,
        verbose: bool = True) -> dict:
    """Returns {policy: Tally}."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    say = print if verbose else (lambda *a, **k: None)
    ours_model = nk_model.load_model(str(folder))
    hf = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()
    tallies = {policy: Tally() for policy in policies}
    for key, ids in paper_prompts(data_dir, folder, n_prompts):
        t0 = time.time()
        for policy in policies:
            theirs = kvpress_generate(hf, ids, policy)
            ours = nanokv_generate(ours_model, ids, policy)
            compare(tallies[policy], theirs, ours, policy, key)
        say(f"prompt {key}: L={len(ids)}, {time.time() - t0:.1f}s", flush=True)
    return tallies


def report(tallies: dict) -> int:
    import transformers
    from importlib.metadata import version

    print(f"\nkvpress {version('kvpress')}, transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"DecodingPress(interval={INTERVAL}, target={TARGET}, buffer={BUFFER}), {NEW_TOKENS} new tokens, greedy.")
    print("heads: (prompt, cut, layer, KV head) kept sets compared, up to the first differing token.")
    print(f"{'policy':<14} {'prompts':>7} {'same tokens':>11} {'heads':>6} {'identical':>9} {'exact ties':>10} "
          f"{'ties':>5} {'inherited':>9} {'REAL':>5} {'sched':>5} {'not cmp':>7}")
    real = 0
    for policy, t in tallies.items():
        print(f"{policy:<14} {t.prompts:>7} {t.tokens_identical:>11} {t.heads:>6} {t.identical:>9} {t.exact_ties:>10} "
              f"{t.ties:>5} {t.inherited:>9} {t.real:>5} {t.schedule_diffs:>5} {t.not_compared:>7}")
        if t.layers_with_ties:
            print("    layers with ties:", sorted(t.layers_with_ties))
        if t.first_token_diffs:
            print("    first differing token (prompt, index):", t.first_token_diffs)
        for e in t.examples:
            print("    REAL:", e)
        if policy == "streaming_llm":
            print(f"    after the first cut: {t.later_cuts} heads; kvpress keeps other positions than the {N_SINK} first and "
                  f"the most recent in {t.later_differ}, nanokv in {t.later_nanokv_wrong}")
            for e in t.later_examples:
                print(f"    e.g. prompt {e['prompt']}, layer {e['layer']}, cut at step {e['step']}, head {e['head']}: kvpress "
                      f"keeps older {e['kvpress_keeps']} and drops recent {e['kvpress_drops']}")
        # streaming_llm: kvpress's second cut keeps other positions, so only tokens up to the one that
        # decode forward 2 * INTERVAL produces (index 2 * INTERVAL) must agree
        bad_tokens = any(i <= 2 * INTERVAL or policy != "streaming_llm" for _, i in t.first_token_diffs)
        real += t.real + t.schedule_diffs + t.later_nanokv_wrong + int(bad_tokens)
    print(f"\n{'FAIL' if real else 'OK'}: {real} real difference(s)")
    return 1 if real else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=10, help="first N prompts of sys_ifeval_shuffled.jsonl")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the paper's data files")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return report(run(args.prompts, tuple(args.policies), args.model, args.data))


if __name__ == "__main__":
    sys.exit(main())
