"""Query-aware compression (--query-aware): the system turn compressed together with the user turn.

The policy scores the system turn with the queries of system and user turn; only the system
turn's entries are evictable, with its own budget; the user turn is kept whole. Checked against
a float64 reference built from the full attention matrix of the whole prefill, for every
policy and allocation (counts), batched rows against rows alone, and the scripts end to end:
records and run.json say the mode, and a folder holding both modes resumes.
"""
import json
import math
import os

import pytest
import torch

import evaluate
import leak
from experiment import RunFolder
from conftest import answers, records
from policies import ALLOCATIONS, POLICIES, REPLAYS, Compression, compress
from reference import ref_attention, ref_avg_pool, ref_gqa_mean

SYSTEM, USER = 40, 13                        # the user turn's last token is fed after compression: 12 in the prefill


def prefill(model, system_rows, user_rows, dtype=torch.float32):
    """The query-aware prefill of a batch: system turns (right-padded), then user turns (right-padded)."""
    cache = model.new_cache(len(system_rows))
    cache.record_queries()
    for rows in [rows for rows in (system_rows, user_rows) if rows]:
        width = max(map(len, rows))
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        real = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, row in enumerate(rows):
            tokens[b, :len(row)], real[b, :len(row)] = torch.tensor(row), True
        model(tokens, cache, real=real)
    return cache


def random_rows(model, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.args.vocab_size, (n,), generator=g).tolist() for n in lengths]


# ----------------------------------------------------------------------------- float64 references

def ref_scores(policy, q, k, total):
    """The plain policy's scores (H_kv, total) over the whole prefill, from the float64 attention matrix."""
    A = ref_attention(q, k)                                               # (H, total, total)
    kv_heads = k.shape[1]
    if policy == "h2o":
        return ref_gqa_mean(torch.stack([A[:, j:, j].sum(1) / (total - j) for j in range(total)], 1), kv_heads)
    if policy == "snapkv":
        window, kernel = 16, 5
        observed = A[:, total - window:, :total - window].mean(1)         # (H, total - window)
        pooled = torch.stack([ref_avg_pool(row, kernel) for row in observed])
        scores = torch.cat([pooled, torch.full((A.shape[0], window), math.inf, dtype=torch.float64)], 1)
        return ref_gqa_mean(scores, kv_heads)
    if policy == "tova":
        scores = A[:, total - 1].mean(0).clone()
        scores[total - 1] = math.inf
        return scores.expand(kv_heads, total)
    if policy == "streaming_llm":
        scores = torch.arange(total, dtype=torch.float64)
        scores[:4] = math.inf
        return scores.expand(kv_heads, total)
    if policy == "knorm":
        return -k[0].double().norm(dim=-1)
    raise KeyError(policy)


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova", "streaming_llm", "knorm"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_query_aware_selection_equals_the_float64_reference(tiny_model, policy, ratio):
    """Kept = the user turn, plus each KV head's n_kept = budget(system turn) best system positions, ranked by
    the policy's scores over the whole system + user prefill with all its queries."""
    system, user = random_rows(tiny_model, [SYSTEM, USER], seed=11)
    cache = prefill(tiny_model, [system], [user[:-1]])
    total = SYSTEM + USER - 1
    inputs = [(q.clone(), cache.keys[i][:, :, :total].clone()) for i, q in enumerate(cache.queries)]
    spec = Compression(policy, ratio)
    compressed = compress(cache, spec, system_len=[SYSTEM])
    reports = compressed.reports
    n_kept = spec.n_kept(SYSTEM)
    assert reports[0]["system_len"] == SYSTEM and reports[0]["n_kept"] == n_kept
    for layer, (q, k) in enumerate(inputs):
        kept = compressed.kept[layer][0]                                  # (H_kv, total)
        assert kept[:, SYSTEM:].all()                                     # the user turn stays whole
        scores = ref_scores(policy, q, k, total)[:, :SYSTEM]
        for h in range(k.shape[1]):                                       # the best n_kept, up to exact ties
            mine = kept[h, :SYSTEM]                                      # (knorm: a repeated token at layer 0)
            assert int(mine.sum()) == n_kept, (layer, h)
            lowest_kept, best_evicted = scores[h][mine].min(), scores[h][~mine].max()
            assert lowest_kept >= best_evicted - 1e-6 * max(1.0, abs(float(best_evicted))), (layer, h)
            if policy == "tova":                                          # its anchor is the user turn's
                assert not scores[h].isinf().any()
            if policy == "snapkv":                                        # its window: 12 user + 4 system tokens
                assert scores[h].isinf().nonzero()[:, 0].tolist() == list(range(SYSTEM - 4, SYSTEM))
    assert cache.lengths == [n_kept + USER - 1] * len(inputs)
    assert float(compressed.keep_rate(0).sum()) == pytest.approx(n_kept)  # keep rates are the system turn's


def test_the_user_turn_changes_what_survives(tiny_model):
    """The same system turn, compressed alone and with a user turn: SnapKV's window now lies in the user turn."""
    system, user = random_rows(tiny_model, [SYSTEM, USER], seed=11)
    aware = compress(prefill(tiny_model, [system], [user[:-1]]), Compression("snapkv", 0.5), system_len=[SYSTEM])
    plain = compress(prefill(tiny_model, [system], []), Compression("snapkv", 0.5))
    assert not all(torch.equal(a[0, :, :SYSTEM], p[0]) for a, p in zip(aware.kept, plain.kept))
    assert all(bool(p[0, :, SYSTEM - 16:].all()) for p in plain.kept)    # alone: its own window is kept
    assert not all(bool(a[0, :, SYSTEM - 16:SYSTEM].all()) for a in aware.kept)


@pytest.mark.parametrize("policy,allocation", [(p, a) for p in POLICIES if p != "full" and p not in REPLAYS
                                               for a in ALLOCATIONS])
def test_every_policy_and_allocation_keeps_the_system_budget(tiny_model, policy, allocation):
    system, user = random_rows(tiny_model, [SYSTEM, USER], seed=3)
    cache = prefill(tiny_model, [system], [user[:-1]])
    spec = Compression(policy, 0.6, allocation=allocation, whitelist=[5, 6, 7])
    compressed = compress(cache, spec, system_len=[SYSTEM])
    report, = compressed.reports
    n_kept = spec.n_kept(SYSTEM)
    for kept in compressed.kept:
        assert kept[0, :, SYSTEM:].all() and kept[0, :, [5, 6, 7]].all()
        if allocation == "uniform":
            assert (kept[0, :, :SYSTEM].sum(-1) == n_kept).all()
        if allocation == "adakv":
            assert int(kept[0, :, :SYSTEM].sum()) == kept.shape[1] * n_kept
    assert report["n_kept"] == n_kept and report["whitelist_kept"] == 1.0


def test_kvzip_is_refused_with_a_user_turn(tiny_model):
    system, user = random_rows(tiny_model, [SYSTEM, USER], seed=3)
    cache = prefill(tiny_model, [system], [user[:-1]])
    with pytest.raises(ValueError, match="kvzip.*user turn"):
        compress(cache, Compression("kvzip", 0.5), system_len=[SYSTEM])


def test_fair_eviction_is_refused_with_a_user_turn(tiny_model):
    system, user = random_rows(tiny_model, [SYSTEM, USER], seed=3)
    cache = prefill(tiny_model, [system], [user[:-1]])
    with pytest.raises(ValueError, match="fair eviction"):
        compress(cache, Compression("snapkv", 0.5, partitions=[(0, 20), (20, SYSTEM)]), system_len=[SYSTEM])


def test_batched_rows_equal_rows_alone_in_float32(tiny_model):
    """Rows of different system and user lengths (holes between a short system turn and its user turn)
    keep exactly what they keep alone, and decode the same tokens after."""
    from model import generate
    systems = random_rows(tiny_model, [40, 31, 45], seed=5)
    users = random_rows(tiny_model, [9, 14, 6], seed=6)
    spec = Compression("h2o", 0.5)
    cache = prefill(tiny_model, systems, [u[:-1] for u in users])
    kept_batched = compress(cache, spec, system_len=[len(s) for s in systems]).kept
    answers_batched = generate(tiny_model, cache, torch.tensor([[u[-1]] for u in users]), 6, stop_ids=[])
    for b, (system, user) in enumerate(zip(systems, users)):
        alone = prefill(tiny_model, [system], [user[:-1]])
        kept_alone = compress(alone, spec, system_len=[len(system)]).kept
        for batched, single in zip(kept_batched, kept_alone):
            S = len(system)
            assert torch.equal(batched[b, :, :S], single[0, :, :S])
            user_slots = batched[b, :, 45:45 + len(user) - 1]            # after the widest system turn
            assert user_slots.all() and not batched[b, :, S:45].any() and not batched[b, :, 45 + len(user) - 1:].any()
        assert generate(tiny_model, alone, torch.tensor([[user[-1]]]), 6, stop_ids=[])[0] == answers_batched[b]


# ----------------------------------------------------------------------------- the scripts

def test_evaluate_query_aware_records_the_mode(tmp_path, tiny_chat):
    out = str(tmp_path / "out")
    evaluate.main(["--model", tiny_chat, "--policy", "snapkv", "--ratios", "0,0.5", "--limit", "3",
                   "--max-new-tokens", "3", "--query-aware", "--batch-size", "2", "--out", out])
    rs = records(out)
    assert {r["setting"] for r in rs} == {"snapkv+query-aware|none"} and all(r["query_aware"] for r in rs)
    assert all(sum(r["token_keep"]) == pytest.approx(r["n_kept"], abs=0.01) for r in rs)
    assert json.load(open(os.path.join(out, "run.json")))["query_aware"] == "on"
    one = str(tmp_path / "one")
    evaluate.main(["--model", tiny_chat, "--policy", "snapkv", "--ratios", "0,0.5", "--limit", "3",
                   "--max-new-tokens", "3", "--query-aware", "--batch-size", "1", "--out", one])
    assert answers(one) == answers(out)                                  # float32: batch size changes nothing


def test_leak_both_modes_in_one_folder_resume_after_a_kill(tmp_path, tiny_chat, monkeypatch):
    """--query-aware both: every setting in both modes, one compression per (prompt, attack) when query-aware;
    a kill after the first batch, then a rerun, loses and duplicates nothing."""
    flags = ["--model", tiny_chat, "--policy", "snapkv", "--remedy", "none,protect", "--ratios", "0.5", "--limit",
             "3", "--max-new-tokens", "3", "--batch-size", "2", "--attack", "repeat-previous", "--attack",
             "list-rules", "--query-aware", "both"]
    real_figures = leak.LEAK.figures
    monkeypatch.setattr(leak.LEAK, "figures", lambda *args: [])         # drawn once, at the end
    whole = str(tmp_path / "whole")
    leak.main([*flags, "--out", whole])
    expected = answers(whole, "records.jsonl")
    assert len(expected) == 2 * 2 * 3 * 3                                 # modes x remedies x prompts x answers
    rs = records(whole, "records.jsonl")
    assert {(r["setting"], r["query_aware"]) for r in rs} == {
        ("snapkv|none", False), ("snapkv|protect", False),
        ("snapkv+query-aware|none", True), ("snapkv+query-aware|protect", True)}
    for r in rs:                                                          # the user turn is kept outside the budget
        assert sum(r["token_keep"]) == pytest.approx(r["n_kept"], abs=0.01)
    aware = [r for r in rs if r["query_aware"] and r["remedy"] == "none"]
    by_job = {}
    for r in aware:
        by_job.setdefault(r["job"], set()).add(tuple(r["token_keep"]))
    assert any(len(v) > 1 for v in by_job.values())                     # each attack compressed on its own

    killed = str(tmp_path / "killed")
    real_append = RunFolder.append
    calls = []
    def dies_after_one_batch(self, batch_records):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        real_append(self, batch_records)
    monkeypatch.setattr(RunFolder, "append", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        leak.main([*flags, "--out", killed])
    monkeypatch.setattr(RunFolder, "append", real_append)
    monkeypatch.setattr(leak.LEAK, "figures", real_figures)
    leak.main([*flags, "--out", killed])
    assert answers(killed, "records.jsonl") == expected
    summary = json.load(open(os.path.join(killed, "summary.json")))
    assert set(summary["composite_gain"]) == {"snapkv", "snapkv+query-aware"}
    assert os.path.isfile(os.path.join(killed, "fig_query_aware.png"))


def test_query_aware_with_decode_cuts(tmp_path, tiny_chat):
    """--query-aware with --decode-target: the system and user turns compressed together, then cut while the
    answer grows (a cut at decode forward 16 of 23). The cuts evict from the system turn and change the
    answers; a row's answer does not depend on the batch."""
    base = ["--model", tiny_chat, "--policy", "snapkv", "--ratios", "0.5", "--limit", "3", "--query-aware",
            "--max-new-tokens", "24"]
    runs = {}
    for name, extra in [("aware", []), ("cut", ["--decode-target", "12"]),
                        ("cut1", ["--decode-target", "12", "--batch-size", "1"])]:
        runs[name] = str(tmp_path / name)
        evaluate.main(base + extra + ["--out", runs[name]])
    rs, aware = records(runs["cut"]), records(runs["aware"])
    assert all(r["query_aware"] and r["decode"]["target"] == 12 and r["setting"] == "snapkv~decode12+query-aware|none"
               for r in rs)
    assert all(r["new_tokens"] == 24 for r in aware)                      # long enough to reach the cut
    assert [r["n_kept"] for r in rs] == [r["n_kept"] for r in aware]      # the same query-aware compression first
    assert answers(runs["cut"]) != answers(runs["aware"])
    assert answers(runs["cut1"]) == answers(runs["cut"])
    kept_to_end = [rate for r in rs for rate in r["keep_end"].values()]
    assert kept_to_end and max(kept_to_end) < min(r["keep"]["directive"] for r in rs)   # cut below the prefill's
