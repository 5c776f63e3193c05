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
  interval 16, buffer 16; with interval > buffer it would hold buffer + 1);
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
streaming_llm only the first cut is checked; the later ones are reported (what kvpress keeps that
the oldest-first rule would not, and the reverse) and nanokv's are checked to be the n_sink first
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
