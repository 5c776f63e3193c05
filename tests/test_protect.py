"""Protected boundaries (--protect N): the first and last N tokens of every part of the system turn
are never evicted, inside the budget, with the whitelist's tier rules.

The parts are checked against the texts they must hold (decoded independently of how they were
found), the boundaries against a position-by-position definition, and the selection, at every
ratio and allocation, against the tier rules written out per KV head.
"""
import json
import math

import pytest
import torch

import evaluate
import experiment
import leak
import prompts as P
from experiment import boundaries, system_parts
from flags import DEFAULT_PROTECT
from policies import ALLOCATIONS, POLICIES, REPLAYS, Compression, Context
from reference import kept_masks
from conftest import records


@pytest.fixture(scope="module")
def tok(default_model_folder):
    from tokenizer import load_tokenizer
    return load_tokenizer(default_model_folder)


def paper_style_prompt():
    """A prompt as the paper's data gives it: one directive text, the instructions' sentences unknown."""
    return P.Prompt("p1", [P.Instruction("punctuation:no_comma", {})], "Do not use any commas in your answer.",
                    "Describe a cat.")


@pytest.mark.parametrize("defense", ["defense-first", "directive-first"])
def test_parts_are_the_turns_pieces(tok, defense):
    """Head, defense, PREPEND, each instruction (or the directive), end of turn: contiguous, covering, and
    each holding exactly its piece's text (a leading separator such as ' ' or '\\n\\n' included)."""
    for prompt in [*P.builtin_prompts()[:6], paper_style_prompt()]:
        system = P.build_system_message(prompt, P.BUILTIN_DEFENSES[defense])
        encoding, _ = tok.chat_ids(system.text, prompt.task)
        parts = system_parts(encoding, system)
        assert parts[0][0] == 0 and parts[-1][1] == len(encoding.ids)
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))             # contiguous
        texts = [tok.decode(encoding.ids[s:e]) for s, e in parts]
        guard = P.BUILTIN_DEFENSES[defense].template.replace(P.SLOT, "").strip()
        instructions = [i.text for i in prompt.instructions if i.text] or [prompt.directive]
        pieces = ([guard, P.PREPEND.strip(), *instructions] if defense == "defense-first"
                  else [P.PREPEND.strip(), *instructions, guard])
        assert texts[0] == "<|im_start|>system\n" and texts[-1] == "<|im_end|>\n"
        assert [t.strip() for t in texts[1:-1]] == [p.strip() for p in pieces], texts


@pytest.mark.parametrize("n", [0, 1, 2, 4, 100])
def test_boundaries_are_the_first_and_last_n_of_every_part(n):
    parts = [(0, 3), (3, 40), (40, 45), (45, 46), (46, 60)]
    expected = [p for p in range(60) for s, e in parts if s <= p < e and (p - s < n or e - 1 - p < n)]
    assert boundaries(parts, n) == expected
    if n == 1:
        assert boundaries(parts, n) == [0, 2, 3, 39, 40, 44, 45, 46, 59]


# ----------------------------------------------------------------------------- the selection keeps them

L = 60
PARTS = [(0, 3), (3, 30), (30, 41), (41, 58), (58, 60)]         # header, defense, two instructions, end
PROTECTED = boundaries(PARTS, 4)                                 # 3 + 8 + 8 + 8 + 2 = 29 positions


@pytest.fixture(scope="module")
def layers(tiny_model):
    tokens = torch.randint(0, tiny_model.args.vocab_size, (1, L), generator=torch.Generator().manual_seed(7))
    cache = tiny_model.new_cache()
    cache.record_queries()
    tiny_model(tokens, cache)
    return [(q.clone(), cache.keys[i][:, :, :L].clone(), cache.values[i][:, :, :L].clone())
            for i, q in enumerate(cache.queries)]


@pytest.mark.parametrize("policy,allocation", [(p, a) for p in POLICIES if p != "full" and p not in REPLAYS
                                               for a in ALLOCATIONS])      # KVzip scores a replay: test_kvzip
def test_protected_boundaries_follow_the_tier_rules_at_every_ratio(layers, tiny_model, policy, allocation):
    """Per (layer, KV head) with count n: min(n, |+inf|) policy-protected entries, then min(rest, |boundaries|)
    boundary tokens, the best-scored of them when they do not all fit; only then anything else. At r = 0.9
    and 0.95 the 29 boundary tokens exceed every budget."""
    assert len(PROTECTED) == 29
    for ratio in (0.25, 0.5, 0.75, 0.9, 0.95):
        spec = Compression(policy, ratio, allocation=allocation, whitelist=PROTECTED)
        masks = kept_masks(spec, layers, tiny_model.inv_freq)
        for index, (q, k, v) in enumerate(layers):
            kept = masks[index]
            scores = POLICIES[policy](q, k, v, [(0, L)], Context(index, len(layers), inv_freq=tiny_model.inv_freq))[0]
            for h in range(k.shape[1]):
                n = int(kept[h].sum())
                inf = scores[h] == math.inf
                listed = torch.zeros(L, dtype=torch.bool)
                listed[PROTECTED] = True
                listed &= ~inf
                n_inf = min(n, int(inf.sum()))
                n_listed = min(n - n_inf, int(listed.sum()))
                assert int((kept[h] & inf).sum()) == n_inf, (ratio, index, h)
                assert int((kept[h] & listed).sum()) == n_listed, (ratio, index, h)
                if 0 < n_listed < int(listed.sum()):                    # the budget wins: the best-scored stay
                    assert scores[h][kept[h] & listed].min() >= scores[h][~kept[h] & listed].max()
            if allocation == "uniform":
                assert (kept.sum(-1) == spec.n_kept(L)).all()


# ----------------------------------------------------------------------------- the scripts

def test_evaluate_protect_whitelists_the_boundaries_with_the_phrases(tmp_path, tiny_chat, tok, monkeypatch):
    specs = []
    real_compression = experiment.Compression
    monkeypatch.setattr(experiment, "Compression", lambda *a, **k: specs.append(k) or real_compression(*a, **k))
    out = str(tmp_path / "out")
    evaluate.main(["--model", tiny_chat, "--policy", "snapkv", "--ratios", "0.5", "--limit", "2", "--max-new-tokens",
                   "2", "--protect", "2", "--whitelist", "defense", "--out", out])
    for spec, prompt in zip(specs, P.builtin_prompts()[:2]):
        system = P.build_system_message(prompt, P.BUILTIN_DEFENSES["defense-first"])
        encoding, _ = tok.chat_ids(system.text, prompt.task)
        phrase = list(range(*encoding.token_span(0, *system.spans["whitelist:0"])))
        assert spec["whitelist"] == sorted(set(phrase) | set(boundaries(system_parts(encoding, system), 2)))
    assert {r["setting"] for r in records(out)} == {"snapkv|whitelist+protect2"}
    assert json.load(open(f"{out}/run.json"))["protect"] == 2


def test_leak_protect_is_a_remedy_of_its_own(tmp_path, tiny_chat, tok, monkeypatch):
    specs = []
    real_compression = experiment.Compression
    monkeypatch.setattr(experiment, "Compression", lambda *a, **k: specs.append(k) or real_compression(*a, **k))
    out = str(tmp_path / "out")
    leak.main(["--model", tiny_chat, "--policy", "streaming_llm", "--remedy", "none,protect", "--ratios", "0.5,0.9",
               "--limit", "1", "--max-new-tokens", "2", "--out", out])
    prompt = P.builtin_prompts()[0]
    system = P.build_system_message(prompt, P.BUILTIN_DEFENSES["defense-first"])
    encoding, _ = tok.chat_ids(system.text, prompt.task)
    default = boundaries(system_parts(encoding, system), DEFAULT_PROTECT)
    assert [s["whitelist"] for s in specs] == [None, None, default, default]
    rs = records(out, "records.jsonl")
    assert {r["setting"] for r in rs} == {"streaming_llm|none", "streaming_llm|protect"}
    protected = [r for r in rs if r["remedy"] == "protect"]
    assert all(r["whitelist_kept"] == 1.0 for r in protected if r["ratio"] == 0.5)
    assert all(r["whitelist_kept"] < 1.0 for r in protected if r["ratio"] == 0.9)   # over the budget: it wins
    summary = json.load(open(f"{out}/summary.json"))
    assert set(summary["composite_gain"]["streaming_llm"]) == {"protect"}
