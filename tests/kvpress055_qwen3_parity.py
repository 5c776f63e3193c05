"""Parity of nanokv with NVIDIA kvpress 0.5.5 on Qwen3 (q_norm / k_norm before RoPE, head_dim from the config):
the paper's five policies on a tiny random Qwen3 checkpoint made by transformers.

    streaming_llm  <->  StreamingLLMPress(n_sink=4)
    h2o            <->  ObservedAttentionPress                 (HF eager attention: it needs the weights)
    knorm          <->  KnormPress
    snapkv         <->  SnapKVPress(window_size=16, kernel_size=5)
    tova           <->  TOVAPress

at r in {0.25, 0.5, 0.75, 0.9}, on random prompts of distinct tokens (a repeated token gives K-norm exact ties
in layer 0). For every (prompt, layer, KV head) the positions nanokv keeps (policies.prefill) are compared
with those kvpress keeps (the `topk` indices of ScorerPress.compress, recorded by wrapping the press and
checked against the keys it gathered). Where they differ, every differing position's kvpress score is
compared with kvpress's cut (the head's k-th largest score), relative gap: exact ties (== 0), ties (<= 1e-6,
float32 rounding of the same scores) or REAL; the script exits 1 on any REAL difference.

kvpress computes SnapKV's and TOVA's window attention again from the layer's input (q_proj, then q_norm, then
RoPE: kvpress.utils.get_prerope_query_states); nanokv reads the queries the cache recorded. H2O's scores are
the attention a key receives, from HF's eager attention in kvpress and from nanokv's prefill observer.

Run from the repository root in the kvpress 0.5.5 venv (transformers 5.2.0; see tests/kvpress055_parity.py):

    ../kvpress055/bin/python tests/kvpress055_qwen3_parity.py              # 8 prompts, about a minute
    ../kvpress055/bin/python tests/kvpress055_qwen3_parity.py --prompts 2 --policies snapkv tova
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import load_model  # noqa: E402
from policies import Compression, prefill  # noqa: E402

RATIOS = (0.25, 0.5, 0.75, 0.9)
TIE_TOL = 1e-6
POLICIES = {  # nanokv policy -> (kvpress press, its settings, nanokv options, needs eager attention)
    "streaming_llm": ("StreamingLLMPress", {"n_sink": 4}, {"n_sink": 4}, False),
    "h2o": ("ObservedAttentionPress", {}, {}, True),
    "knorm": ("KnormPress", {}, {}, False),
    "snapkv": ("SnapKVPress", {"window_size": 16, "kernel_size": 5}, {"window": 16, "kernel": 5}, False),
    "tova": ("TOVAPress", {}, {}, False),
}
QWEN3 = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=24, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6)


def make_qwen3(folder: Path, seed: int = 0) -> None:
    """A random Qwen3 checkpoint saved by transformers, its weights large enough that attention is not uniform."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(Qwen3Config(**QWEN3))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    hf.save_pretrained(str(folder))


def kvpress_kept(hf_model, ids: torch.Tensor, policy: str, ratio: float) -> tuple[list, list]:
    """One prefill under the press. Returns per layer kept (H_kv, L) bool and kvpress's scores (H_kv, L)."""
    import kvpress
    from transformers import DynamicCache

    name, settings, _, _ = POLICIES[policy]
    press = getattr(kvpress, name)(compression_ratio=ratio, **settings)
    scores, kept = {}, {}
    score_fn, compress_fn = press.score, press.compress

    def score(module, hidden_states, keys, values, attentions, kwargs):
        s = score_fn(module, hidden_states, keys, values, attentions, kwargs)
        scores[module.layer_idx] = s.detach().clone()
        return s

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        new_keys, new_values = compress_fn(module, hidden_states, keys, values, attentions, kwargs)
        index = scores[module.layer_idx].topk(new_keys.shape[2], dim=-1).indices     # the call kvpress made
        gathered = keys.gather(2, index[..., None].expand(-1, -1, -1, keys.shape[-1]))
        assert torch.equal(gathered, new_keys), "recorded indices are not the ones kvpress gathered"
        kept[module.layer_idx] = torch.zeros(keys.shape[:3], dtype=torch.bool).scatter_(2, index, True)[0]
        return new_keys, new_values

    press.score, press.compress = score, compress
    with torch.no_grad(), press(hf_model):
        hf_model(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    n = hf_model.config.num_hidden_layers
    assert sorted(kept) == list(range(n)), "a layer was not compressed"
    return [kept[i] for i in range(n)], [scores[i][0].float() for i in range(n)]


def classify(ours: torch.Tensor, theirs: torch.Tensor, scores: torch.Tensor) -> list[str]:
    """Per KV head: identical, exact_ties, ties or REAL (see the module docstring). ours, theirs, scores (H_kv, L)."""
    verdicts = []
    for h in range(ours.shape[0]):
        diff = (ours[h] ^ theirs[h]).nonzero().flatten()
        if diff.numel() == 0:
            verdicts.append("identical")
            continue
        cut = scores[h][theirs[h]].min()
        gap = float(((scores[h, diff] - cut).abs() / cut.abs().clamp_min(1e-30)).max())
        verdicts.append("exact_ties" if gap == 0 else "ties" if gap <= TIE_TOL else "REAL")
    return verdicts


def run(n_prompts: int, policies, ratios, verbose: bool = True) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    tally = {(p, r): dict(heads=0, identical=0, exact_ties=0, ties=0, REAL=0) for p in policies for r in ratios}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen3"
        make_qwen3(folder)
        ours_model = load_model(str(folder))
        hf = {eager: AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                          attn_implementation="eager" if eager else "sdpa").eval()
              for eager in (False, True)}
        generator = torch.Generator().manual_seed(1)
        for prompt in range(n_prompts):
            t0 = time.time()
            L = int(torch.randint(40, 200, (1,), generator=generator))
            ids = torch.randperm(QWEN3["vocab_size"], generator=generator)[:L][None]
            for policy in policies:
                _, _, options, eager = POLICIES[policy]
                for r in ratios:
                    cache = ours_model.new_cache(capacity=L)
                    kept = prefill(ours_model, cache, ids, Compression(policy, r, options=options)).kept
                    theirs, scores = kvpress_kept(hf[eager], ids, policy, r)
                    for layer in range(len(theirs)):
                        for verdict in classify(kept[layer][0, :, :L], theirs[layer], scores[layer]):
                            tally[(policy, r)]["heads"] += 1
                            tally[(policy, r)][verdict] += 1
            if verbose:
                print(f"prompt {prompt}: L={L}, {time.time() - t0:.1f}s", flush=True)
    return tally


def report(tally: dict) -> int:
    import transformers
    from importlib.metadata import version

    print(f"\nkvpress {version('kvpress')}, transformers {transformers.__version__}, torch {torch.__version__}; "
          f"tiny random Qwen3 ({QWEN3['num_hidden_layers']} layers, {QWEN3['num_key_value_heads']} KV heads, "
          f"head_dim {QWEN3['head_dim']}), float32")
    print(f"{'policy':<14} {'r':>5} {'heads':>6} {'identical':>10} {'exact ties':>11} {'ties':>5} {'REAL':>5}")
    for (policy, r), t in tally.items():
        print(f"{policy:<14} {r:>5} {t['heads']:>6} {t['identical']:>10} {t['exact_ties']:>11} {t['ties']:>5} "
              f"{t['REAL']:>5}")
    real = sum(t["REAL"] for t in tally.values())
    print(f"\n{'FAIL' if real else 'OK'}: {real} real difference(s)")
    return 1 if real else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return report(run(args.prompts, tuple(args.policies), tuple(args.ratios)))


if __name__ == "__main__":
    sys.exit(main())
