"""Parity of nanokv's KVzip with NVIDIA kvpress 0.5.5's KVzipPress on the real default model.

On the paper's leakage prompts (the system turn alone, standard defense), compare for every layer and
KV head the positions nanokv keeps with those KVzipPress keeps, at r in {0.25, 0.5, 0.75, 0.9}:

    default     Compression("kvzip", r, allocation="global")                  KVzipPress(r)
    layerwise   ... allocation_options={"layerwise": True}                    KVzipPress(r, layerwise=True)
    plus        ... options={"plus": True}                                    KVzipPress(r, kvzip_plus_normalization=True)
    chunk64     ... options={"chunk_size": 64}                                KVzipPress(r, chunk_size=64)

KVzipPress replays the context after the number of tokens a *user* message's template puts before its
content (24 for SmolLM2's ChatML, which adds a default system message), so on a system turn it skips
the header and the first ~21 tokens of the system text. nanokv replays the turn after its own header
(tokenizer.replay: 3 tokens). To replay the same text, the press's `prefix_length` is set to the
header's length inside its context manager, before the prefill. KVzipPress evicts nothing itself: it
records the evicted (batch, head, position) in each attention module's `masked_key_indices`; the kept
set is the complement. Its scores are read from `score_val` just before `compress_post`.

Where kept sets differ, each differing position's kvpress score is compared with kvpress's cut (the
smallest kept score of the group it ranks: all layers, or one layer with layerwise), relative gap:
exact ties (== 0), ties (<= 1e-6: float32 rounding), REAL otherwise (exit 1).

--unpatched also runs KVzipPress as it is (its own prefix length) against nanokv replaying from the same
position, and reports how KVzipPress's own default differs from the patched run: the positions it never
replays score 0 and go first.

Environment: the kvpress 0.5.5 venv of tests/kvpress055_parity.py. From the repository root:

    ../kvpress055/bin/python tests/kvpress055_kvzip_parity.py              # 10 prompts, every run
    ../kvpress055/bin/python tests/kvpress055_kvzip_parity.py --prompts 3 --runs default --unpatched
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model as nk_model  # noqa: E402
import prompts as nk_prompts  # noqa: E402
import tokenizer as nk_tokenizer  # noqa: E402
from policies import Compression, prefill  # noqa: E402

DEFAULT_MODEL = ROOT / "weights" / "smollm2-135m-instruct"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "paper"
RATIOS = (0.25, 0.5, 0.75, 0.9)
TIE_TOL = 1e-6
RUNS = {
    "default": (dict(allocation="global"), dict()),
    "layerwise": (dict(allocation="global", allocation_options={"layerwise": True}), dict(layerwise=True)),
    "plus": (dict(allocation="global", options={"plus": True}), dict(kvzip_plus_normalization=True)),
    "chunk64": (dict(allocation="global", options={"chunk_size": 64}), dict(chunk_size=64)),
}


def system_turns(data_dir: Path, tok, n: int):
    """(key, system-turn encoding) of the first n shuffled prompts with the standard defense."""
    records = nk_prompts.load_sys_ifeval(data_dir / "sys_ifeval_shuffled.jsonl")[:n]
    defense = nk_prompts.load_defenses(data_dir / "defense_template.json")["standard_defense"]
    return [(p.key, tok.chat_ids(nk_prompts.build_system_message(p, defense).text, "unused")[0]) for p in records]


def kvpress_kept(hf_model, ids: torch.Tensor, ratio: float, press_options: dict, prefix: int | None):
    """One prefill under KVzipPress. Returns kept (n_layers, H_kv, L) bool, its scores and its prefix length."""
    from kvpress import KVzipPress
    from transformers import DynamicCache

    press = KVzipPress(compression_ratio=ratio, **press_options)
    recorded = {}
    compress_post = press.compress_post

    def record_then_compress(model):
        recorded["scores"] = press.score_val[:, 0].clone().float()          # (n_layers, H_kv, L), sinks not yet lifted
        recorded["prefix"] = press.prefix_length
        return compress_post(model)

    press.compress_post = record_then_compress
    with torch.no_grad(), press(hf_model):
        if prefix is not None:
            press.prefix_length = prefix                                     # replay the same text as nanokv
        hf_model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    layers = [layer.self_attn for layer in hf_model.model.layers]
    kept = torch.ones(len(layers), hf_model.config.num_key_value_heads, ids.shape[1], dtype=torch.bool)
    for i, module in enumerate(layers):
        batch, head, position = module.masked_key_indices                     # evicted
        kept[i, head, position] = False
        module.masked_key_indices = None
    scores = recorded["scores"]
    scores[..., :press.n_sink] = scores.amax() + 1.0                         # as compress_post ranks them
    return kept, scores, recorded["prefix"]


@dataclass
class Tally:
    heads: int = 0
    identical: int = 0
    exact_ties: int = 0
    ties: int = 0
    real: int = 0
    examples: list = field(default_factory=list)


def tally(t: Tally, ours: torch.Tensor, theirs: torch.Tensor, scores: torch.Tensor, layerwise: bool, where: dict):
    """ours, theirs, scores (n_layers, H_kv, L): classify each (layer, head) against kvpress's cut."""
    for layer in range(ours.shape[0]):
        group = scores[layer] if layerwise else scores
        kept = theirs[layer] if layerwise else theirs
        cut = group[kept].min()
        for h in range(ours.shape[1]):
            t.heads += 1
            diff = (ours[layer, h] ^ theirs[layer, h]).nonzero().flatten()
            if diff.numel() == 0:
                t.identical += 1
                continue
            gap = float(((scores[layer, h, diff] - cut).abs() / cut.abs().clamp_min(1e-30)).max())
            verdict = "exact_ties" if gap == 0 else "ties" if gap <= TIE_TOL else "real"
            setattr(t, verdict, getattr(t, verdict) + 1)
            if verdict == "real" and len(t.examples) < 3:
                t.examples.append(dict(where, layer=layer, head=h, positions=diff.tolist(), gap=gap))


def ours_kept(model, encoding, tok, ratio: float, spec_options: dict, start: int | None) -> torch.Tensor:
    replay = tok.replay(encoding)
    if start is not None:
        replay = replace(replay, start=start)
    compressed = prefill(model, model.new_cache(capacity=len(encoding.ids)), torch.tensor([encoding.ids]),
                         Compression("kvzip", ratio, **spec_options), replay=replay)
    return torch.stack([k[0] for k in compressed.kept])


def run(n_prompts=10, runs=tuple(RUNS), ratios=RATIOS, unpatched=False, folder=DEFAULT_MODEL, data_dir=DEFAULT_DATA):
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    model, tok = nk_model.load_model(str(folder)), nk_tokenizer.load_tokenizer(folder)
    hf = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()
    tallies = {(name, r): Tally() for name in runs for r in ratios}
    skipped = {}
    for key, encoding in system_turns(data_dir, tok, n_prompts):
        t0, ids = time.time(), torch.tensor([encoding.ids])
        header = tok.replay(encoding).start
        for name in runs:
            spec_options, press_options = RUNS[name]
            for r in ratios:
                theirs, scores, _ = kvpress_kept(hf, ids, r, press_options, header)
                ours = ours_kept(model, encoding, tok, r, spec_options, None)
                tally(tallies[(name, r)], ours, theirs, scores, name == "layerwise", dict(prompt=key, r=r))
                if unpatched and name == "default":
                    own, own_scores, prefix = kvpress_kept(hf, ids, r, press_options, None)
                    tally(tallies.setdefault(("unpatched", r), Tally()), ours_kept(model, encoding, tok, r, spec_options,
                                                                                   prefix), own, own_scores, False,
                          dict(prompt=key, r=r))
                    skipped.setdefault(r, []).append((prefix, theirs[..., 4:prefix].float().mean().item(),
                                                      own[..., 4:prefix].float().mean().item()))
        print(f"prompt {key}: L={ids.shape[1]}, header {header}, {time.time() - t0:.1f}s", flush=True)
    return tallies, skipped


def report(tallies, skipped) -> int:
    from importlib.metadata import version
    import transformers
    print(f"\nkvpress {version('kvpress')}, transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"{'run':<10} {'r':>5} {'heads':>6} {'identical':>10} {'exact ties':>11} {'ties':>5} {'REAL':>5}")
    real = 0
    for (name, r), t in tallies.items():
        print(f"{name:<10} {r:>5} {t.heads:>6} {t.identical:>10} {t.exact_ties:>11} {t.ties:>5} {t.real:>5}")
        real += t.real
        for e in t.examples:
            print("    REAL:", e)
    for r, rows in skipped.items():
        prefixes = sorted({prefix for prefix, _, _ in rows})
        patched, own = (sum(row[i] for row in rows) / len(rows) for i in (1, 2))
        print(f"unpatched r={r}: KVzipPress on its own replays from position {prefixes} (its user-message prefix), "
              f"so positions 4 .. prefix - 1 score 0: they keep {own:.1%} of their (layer, head) entries against "
              f"{patched:.1%} when it replays from the header")
    print(f"\n{'FAIL' if real else 'OK'}: {real} real difference(s)")
    return 1 if real else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--unpatched", action="store_true", help="also compare with KVzipPress's own prefix length")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return report(*run(args.prompts, tuple(args.runs), tuple(args.ratios), args.unpatched, data_dir=args.data))


if __name__ == "__main__":
    sys.exit(main())
