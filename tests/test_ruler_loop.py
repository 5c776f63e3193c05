"""RULER's prompts in evaluate.py's loop: flags and refusals, records and summary, resume, the spans that
whitelists, fair eviction and keep rates use (against a char-by-char reference), and the report on
hand-made records.

Runs in-process on the tiny random model with the default tokenizer (tests/conftest.py's tiny_chat): its
answers are noise, which is what the plumbing tests need; one test runs the default model.
"""
import functools
import json
import os

import pytest

import evaluate
import experiment
import ruler
from conftest import answers, records
from experiment import RunFolder, UsageError, main_guard
from report import print_ruler, ruler_figures, ruler_summary
from setting import Setting

SMALL = ["--data", "ruler:niah_single_1,vt", "--length", "700", "--limit", "2", "--policy", "snapkv",
         "--ratios", "0,0.5", "--max-new-tokens", "3", "--batch-size", "2"]


def run_evaluate(tmp_path, name, *argv):
    out = str(tmp_path / name)
    evaluate.main([*argv, "--out", out])
    return out


def summary_of(out):
    return json.load(open(os.path.join(out, "summary.json")))


# ----------------------------------------------------------------------------- flags

def test_task_names_aliases_and_order():
    assert evaluate.ruler_tasks("ruler:vt,niah_single") == ["niah_single_1", "vt"]          # RULER's order
    assert evaluate.ruler_tasks("ruler:all") == list(ruler.TASKS)
    assert evaluate.ruler_tasks("ruler: cwe , cwe,niah_multikey") == ["niah_multikey_1", "cwe"]


RULER = ["--data", "ruler:niah_single_1", "--length", "512"]
BAD_INPUTS = [
    (["--data", "ruler:nope"], "unknown RULER task 'nope': choose from niah_single_1"),
    (["--data", "ruler:"], "names no task"),
    (["--data", "ruler: , "], "names no task"),
    ([*RULER[:2], "--length", "0"], "--length 0: give a number of tokens from 1 to 131072"),
    ([*RULER[:2], "--length", "1000000"], "--length 1000000: give a number of tokens"),
    ([*RULER[:2], "--length", "20"], "niah_single_1: 20 tokens is too short"),
    ([*RULER[:2], "--length", "x"], "argument --length: invalid int value: 'x'"),
    ([*RULER[:2], "--length", "1200"], "more than the model's context of 1024"),
    (["--length", "512"], "--length 512 applies to RULER prompts (--data ruler:TASKS) only"),
    ([*RULER, "--limit", "0"], "there is no 'all'"),
    ([*RULER, "--fair", "defense"], "--fair defense needs the instruction prompts; RULER prompts take --fair facts"),
    ([*RULER, "--fair", "instructions"], "--fair instructions needs the instruction prompts"),
    (["--fair", "facts"], "--fair facts needs RULER prompts"),
    ([*RULER, "--whitelist", "defense"], "RULER prompts have no defense; --whitelist facts keeps their facts"),
    ([*RULER, "--whitelist", "NOT IN THE CONTEXT"], "is not in the system message of prompt niah_single_1/512/0/0"),
    ([*RULER, "--order", "reversed"], "--order reversed needs the instruction prompts"),
    ([*RULER, "--defense", "directive-first"], "RULER prompts take no defense"),
    ([*RULER, "--query-aware", "--fair", "facts"], "--query-aware cannot take fair eviction"),
    ([*RULER, "--model", "/nonexistent/model"], "does not exist"),
]


def test_the_answer_prefix_starts_the_answer_as_kvpress_sends_it(tmp_path, tiny_chat):
    """--answer-prefix: each job's user turn ends with RULER's answer prefix, encoded with the whole chat as one
    string (kvpress's pipeline), and nothing else changes: the system turn, the user turn before it, the scoring.
    run.json records it, so a folder made without it does not resume with it."""
    from flags import parse_args, plan_run
    from tokenizer import load_tokenizer
    transformers = pytest.importorskip("transformers")
    tok, hf = load_tokenizer(tiny_chat), transformers.AutoTokenizer.from_pretrained(tiny_chat)

    def jobs(*extra):
        plan = plan_run(evaluate.EVALUATE, parse_args(evaluate.EVALUATE, ["--model", tiny_chat, *SMALL, *extra]))
        return plan, experiment.build_jobs(plan, tok, 2048)
    (plain_plan, plain), (sent_plan, sent) = jobs(), jobs("--answer-prefix")
    assert sent_plan.run_settings["ruler"]["answer_prefix"] is True and "answer_prefix" not in plain_plan.run_settings["ruler"]
    for a, b in zip(plain, sent):
        example = b.prompt.example
        head, whole = tok.chat_ids(example.system, example.user)
        assert b.system_ids == a.system_ids == head.ids and a.user_ids == [whole.ids[len(head.ids):]]
        in_one_string = hf.encode(whole.text + example.answer_prefix, add_special_tokens=False)   # kvpress's way
        assert b.user_ids == [in_one_string[len(head.ids):]] and len(b.user_ids[0]) > len(a.user_ids[0])
        assert tok.decode(b.user_ids[0][len(a.user_ids[0]):]) == example.answer_prefix
    out = run_evaluate(tmp_path, "plain", "--model", tiny_chat, *SMALL)
    with pytest.raises(UsageError, match="holds a run with other settings"):
        evaluate.main(["--model", tiny_chat, *SMALL, "--answer-prefix", "--out", out])
    with pytest.raises(UsageError, match="--answer-prefix applies to RULER prompts"):
        evaluate.main(["--model", tiny_chat, "--answer-prefix", "--out", str(tmp_path / "nothing")])
    assert not (tmp_path / "nothing").exists()


def test_a_length_past_the_context_is_refused_before_any_prompt_is_made(tmp_path, tiny_chat, monkeypatch):
    """--length plus the answer's tokens must fit the model's context: checked before the (slow, at long lengths)
    generation of the prompts, with the advice that helps (every RULER prompt has that length)."""
    monkeypatch.setattr(ruler, "make_example", lambda *a, **k: pytest.fail("a prompt was made"))
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"--length 1022 and --max-new-tokens 4 need 1026 positions, more than "
                                         r"the model's context of 1024: lower --length"):
        evaluate.main([*RULER[:2], "--length", "1022", "--max-new-tokens", "4", "--limit", "2", "--model", tiny_chat,
                       "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("flags, message", BAD_INPUTS, ids=[" ".join(f) for f, _ in BAD_INPUTS])
def test_bad_ruler_input_is_one_line_and_writes_nothing(tmp_path, tiny_chat, capsys, flags, message):
    out = tmp_path / "out"
    for flag, value in (("--model", tiny_chat), ("--out", str(out)), ("--limit", "2"), ("--max-new-tokens", "4")):
        if flag not in flags:
            flags = [*flags, flag, value]
    with pytest.raises(SystemExit) as exit_:
        main_guard(lambda: evaluate.main(flags))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []                                  # nothing written


def test_the_retrieval_preset_sets_the_data_and_a_flag_given_wins():
    args = evaluate.flags.parse_args(evaluate.EVALUATE, ["--preset", "retrieval"])
    assert (args.data, args.length, args.query_aware, args.policy) == ("ruler:niah_single_1", 512, "both", "snapkv")
    args = evaluate.flags.parse_args(evaluate.EVALUATE, ["--preset", "retrieval", "--length", "1024", "--data", "ruler:vt"])
    assert (args.data, args.length, args.out) == ("ruler:vt", 1024, "runs/retrieval")
    args = evaluate.flags.parse_args(evaluate.EVALUATE, [])
    assert (args.data, args.length, args.query_aware) == (None, None, "off")               # the demo: IFEval


# ----------------------------------------------------------------------------- records, summary, run.json, resume

@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_chat):
    return run_evaluate(tmp_path_factory.mktemp("ruler"), "run", "--model", tiny_chat, *SMALL)


def test_records_carry_the_task_its_answers_score_and_keep_rates(small_run):
    rs = records(small_run)
    assert len(rs) == 2 * 2 * 2 and {r["task"] for r in rs} == {"niah_single_1", "vt"}   # ratios x tasks x prompts
    for r in rs:
        example = ruler.make_example(load_tok(small_run), r["task"], 700, 0, int(r["key"].split("/")[3]))
        assert (r["key"], r["user"], r["answers"], r["depths"]) == \
               (example.key, example.user, example.answers, example.depths)
        assert r["score"] == ruler.score(example, r["response"])
        assert len(r["token_keep"]) == r["system_tokens"] and r["n_tokens"] == example.n_tokens
        assert {"facts", "haystack", "instruction"} <= set(r["keep"])
        if r["ratio"] == 0:
            assert all(rate == 1.0 for rate in r["keep"].values())


@functools.lru_cache(maxsize=None)
def load_tok(out):
    from tokenizer import load_tokenizer
    return load_tokenizer(json.load(open(os.path.join(out, "run.json")))["model"])


def test_summary_holds_each_task_with_sem_and_n_and_run_json_the_data_spec(small_run):
    summary = summary_of(small_run)
    assert summary["tasks"] == ["niah_single_1", "vt"]
    row = summary["results"]["snapkv|none"]["0.5"]
    rs = [r for r in records(small_run) if r["ratio"] == 0.5]
    for task in ("niah_single_1", "vt"):
        scores = [r["score"] for r in rs if r["task"] == task]
        assert row["tasks"][task]["n"] == 2 and row["tasks"][task]["score"] == pytest.approx(sum(scores) / 2)
        assert row["tasks"][task]["score_sem"] is not None
    assert row["n_prompts"] == 4 and row["average"] == pytest.approx(
        (row["tasks"]["niah_single_1"]["score"] + row["tasks"]["vt"]["score"]) / 2)
    assert row["keep"]["facts"] == pytest.approx(sum(r["keep"]["facts"] for r in rs) / 4, abs=1e-6)
    run = json.load(open(os.path.join(small_run, "run.json")))
    assert run["ruler"] == {"tasks": ["niah_single_1", "vt"], "length": 700, "seed": 0}
    assert (run["data"], run["length"], run["limit"]) == ("ruler:niah_single_1,vt", 700, 2)
    assert summary["run_settings"] == run
    for name in ("fig_ruler_accuracy.png", "fig_ruler_keep.png", "fig_ruler_context_keep.png"):
        assert os.path.getsize(os.path.join(small_run, name)) > 1000


@pytest.mark.parametrize("change", [["--length", "720"], ["--seed", "1"], ["--data", "ruler:niah_single_1"]])
def test_a_folder_with_other_ruler_settings_is_refused(small_run, tiny_chat, capsys, change):
    argv = [*SMALL, "--model", tiny_chat, "--out", small_run]
    if change[0] in argv:
        argv[argv.index(change[0]) + 1] = change[1]
    else:
        argv += change
    with pytest.raises(SystemExit):
        main_guard(lambda: evaluate.main(argv))
    assert "holds a run with other settings" in capsys.readouterr().err


def test_a_kill_between_batches_then_rerun_gives_the_same_records(tmp_path, tiny_chat, small_run, monkeypatch, capsys):
    killed = str(tmp_path / "killed")
    real_append = RunFolder.append
    calls = []
    def dies_after_two_batches(self, batch_records):
        calls.append(1)
        real_append(self, batch_records)
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(RunFolder, "append", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(["--model", tiny_chat, *SMALL, "--out", killed])
    monkeypatch.setattr(RunFolder, "append", real_append)
    assert len(records(killed)) == 4
    capsys.readouterr()
    evaluate.main(["--model", tiny_chat, *SMALL, "--out", killed])
    assert "resuming: 4 of 8 jobs already in" in capsys.readouterr().err
    assert answers(killed) == answers(small_run)
    assert summary_of(killed) == summary_of(small_run)


# ----------------------------------------------------------------------------- spans: facts, haystack, partitions

def reference_kinds(encoding, example):
    """Each system token's kind, char by char: a token takes the kind of the last character of the context it
    holds (a token straddling two spans goes to the later one); template tokens have none."""
    kinds = [None] * len(encoding.ids)
    for kind, spans in example.spans.items():
        for start, end in spans:
            for char in range(start, end):
                first, last = encoding.token_span(0, char, char + 1)
                assert last == first + 1
                kinds[first] = (char, kind) if kinds[first] is None or kinds[first][0] < char else kinds[first]
    return [None if k is None else evaluate.RULER_NAMES[k[1]] for k in kinds]


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_2", "niah_multivalue", "vt", "cwe", "fwe"])
def test_spans_map_to_the_tokens_of_their_characters(tiny_chat, task):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_chat)
    example = ruler.make_example(tok, task, 800 if task in ("cwe", "vt") else 400, seed=3)
    system, _ = tok.chat_ids(example.system, example.user)
    job = experiment.Job(Setting("snapkv"), 0.5, evaluate.RulerPrompt(example.key, [], example.system, example.user,
                                                                     example=example), None, [])
    spans, _, _ = evaluate.ruler_layout(job, system)
    kinds = [None] * len(system.ids)
    for name, runs in spans.items():
        for start, end in runs:
            assert all(k is None for k in kinds[start:end])                  # disjoint
            kinds[start:end] = [name] * (end - start)
    assert kinds == reference_kinds(system, example)
    facts = "".join(tok.decode(system.ids[s:e]) for s, e in spans["facts"])
    assert all(answer in facts for answer in example.answers)              # the facts' tokens hold the answers
    haystack = "".join(tok.decode(system.ids[s:e]) for s, e in spans["haystack"])
    assert not any(answer in haystack for answer in example.answers) or task == "fwe"   # fwe: answers are words


def test_whitelist_facts_fair_facts_and_protect_reach_the_compression(tmp_path, tiny_chat, monkeypatch):
    specs = []
    real_compression = experiment.Compression
    monkeypatch.setattr(experiment, "Compression", lambda *a, **k: specs.append(k) or real_compression(*a, **k))
    common = ["--model", tiny_chat, "--data", "ruler:niah_single_1", "--length", "400", "--limit", "1",
              "--policy", "knorm", "--ratios", "0.5", "--max-new-tokens", "2"]
    whitelisted = run_evaluate(tmp_path, "whitelist", *common, "--whitelist", "facts")
    fair = run_evaluate(tmp_path, "fair", *common, "--fair", "facts")
    protected = run_evaluate(tmp_path, "protect", *common, "--protect", "3")

    from tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_chat)
    example = ruler.make_example(tok, "niah_single_1", 400)
    system, _ = tok.chat_ids(example.system, example.user)
    kinds = reference_kinds(system, example)
    facts = [t for t, kind in enumerate(kinds) if kind == "facts"]
    assert specs[0]["whitelist"] == facts and specs[0]["partitions"] is None
    runs, start = [], kinds.index("instruction")                           # maximal runs of one kind, in order
    for t in range(start + 1, len(kinds) + 1):
        if t == len(kinds) or kinds[t] != kinds[start]:
            if kinds[start] is not None:
                runs.append((start, t))
            start = t
    assert specs[1]["partitions"] == runs and [kinds[s] for s, _ in runs].count("facts") == 1
    assert specs[1]["whitelist"] is None
    edges = [(0, runs[0][0]), *runs, (runs[-1][1], len(kinds))]
    assert specs[2]["whitelist"] == sorted({p for s, e in edges for p in [*range(s, min(s + 3, e)),
                                                                          *range(max(e - 3, s), e)]})
    [w], [f] = records(whitelisted), records(fair)
    assert w["keep"]["facts"] == 1.0 and w["setting"] == "knorm|whitelist"
    assert abs(f["keep"]["facts"] - 0.5) < 0.1 and f["setting"] == "knorm|fair-facts"   # each part its share
    assert f["keep"]["facts"] == pytest.approx(sum(f["token_keep"][t] for t in facts) / len(facts), abs=1e-4)
    assert summary_of(fair)["settings"]["knorm|fair-facts"]["remedy"]["fair"] == "facts"
    assert records(protected)[0]["setting"] == "knorm|protect3"


# ----------------------------------------------------------------------------- the report on hand-made records

def hand_record(setting, ratio, task, key, score, facts, haystack, policy="snapkv"):
    return dict(job=f"{setting}|{ratio}|{key}", setting=setting, policy=policy, remedy="none", ratio=ratio,
                key=key, task=task, answers=["x"], score=score, keep={"facts": facts, "haystack": haystack},
                token_keep=[facts, haystack, haystack])


def hand_records():
    rs = []
    for setting in ("snapkv|none", "snapkv+query-aware|none"):
        rs += [hand_record(setting, 0.0, "niah_single_1", f"n{i}", 1.0, 1.0, 1.0) for i in range(3)]
        rs += [hand_record(setting, 0.0, "vt", f"v{i}", s, 1.0, 1.0) for i, s in enumerate((0.0, 0.2, 0.4))]
    rs += [hand_record("snapkv|none", 0.5, "niah_single_1", f"n{i}", s, f, 0.5)
           for i, (s, f) in enumerate(((0.0, 0.2), (0.0, 0.4), (1.0, 0.6)))]
    rs += [hand_record("snapkv|none", 0.5, "vt", f"v{i}", 0.0, 0.1, 0.5) for i in range(3)]
    rs += [hand_record("snapkv+query-aware|none", 0.5, "niah_single_1", f"n{i}", 1.0, 0.9, 0.5) for i in range(3)]
    rs += [hand_record("snapkv+query-aware|none", 0.5, "vt", f"v{i}", 0.2, 0.8, 0.5) for i in range(3)]
    return rs


def test_ruler_summary_by_hand():
    summary = ruler_summary(hand_records())
    assert summary["tasks"] == ["niah_single_1", "vt"]
    row = summary["results"]["snapkv|none"]["0.5"]
    niah, vt = row["tasks"]["niah_single_1"], row["tasks"]["vt"]
    assert (niah["score"], niah["n"], vt["score"], vt["score_sem"]) == (pytest.approx(1 / 3), 3, 0.0, 0.0)
    assert niah["score_sem"] == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5, abs=1e-6)      # sd of 0,0,1 = sqrt(1/3)
    assert row["average"] == pytest.approx(1 / 6, abs=1e-6) and row["average_sem"] == pytest.approx(niah["score_sem"] / 2,
                                                                                          abs=1e-6)
    assert row["keep"]["facts"] == pytest.approx((0.2 + 0.4 + 0.6 + 0.3) / 6) and niah["keep"]["facts"] == 0.4
    assert row["keep_sem"]["haystack"] == 0.0 and row["n_prompts"] == 6
    base = summary["results"]["snapkv+query-aware|none"]["0.0"]
    assert base["tasks"]["vt"]["score"] == pytest.approx(0.2) and base["keep"] == {"facts": 1.0, "haystack": 1.0}


def test_ruler_table_and_figures_from_hand_made_records(tmp_path):
    rs = hand_records()
    settings = {s.label: s.fields() for s in (Setting("snapkv"), Setting("snapkv", query_aware=True))}
    summary = {"settings": settings, **ruler_summary(rs)}
    import io
    text = io.StringIO()
    print_ruler(summary, text)
    lines = text.getvalue().splitlines()
    row = next(line for line in lines if line.startswith("snapkv|none") and "niah_single_1" in line).split()
    assert row == ["snapkv|none", "niah_single_1", "3", "1.00±0.00", "0.33±0.33"]
    assert any(line.split()[1:] == ["average", "6", "0.60±0.06", "0.17±0.17"] for line in lines
               if line.startswith("snapkv|none"))
    assert next(line for line in lines if line.startswith("snapkv+query-aware|none ") and "/" in line).split() == \
        ["snapkv+query-aware|none", "1.00±0.00/1.00±0.00", "0.85±0.02/0.50±0.00"]
    example = {"key": "n0", "pieces": ["a", "b", "c"], "spans": {"facts": [(0, 1)], "haystack": [(1, 3)]}}
    written = ruler_figures(summary, rs, str(tmp_path), example)
    assert sorted(os.path.basename(w) for w in written) == ["fig_query_aware.png", "fig_ruler_accuracy.png",
                                                            "fig_ruler_context_keep.png", "fig_ruler_keep.png"]
    assert all(os.path.getsize(w) > 1000 for w in written)


# ----------------------------------------------------------------------------- the default model: the demo's effect

def test_default_model_retrieves_a_needle_unless_snapkv_compresses_before_the_question(tmp_path, default_model_folder):
    """The retrieval demo in small: 3 single-needle prompts of 512 tokens. Full cache: found; SnapKV at r = 0.5
    before the question is known: its window sees only filler, the needle goes; with the question: kept."""
    out = run_evaluate(tmp_path, "demo", "--preset", "retrieval", "--limit", "3", "--model", default_model_folder)
    rows = summary_of(out)["results"]
    accuracy = lambda setting, r: rows[setting][r]["tasks"]["niah_single_1"]["score"]   # noqa: E731
    assert accuracy("snapkv|none", "0.0") == 1.0 and accuracy("snapkv+query-aware|none", "0.0") == 1.0
    assert accuracy("snapkv|none", "0.5") == 0.0
    assert accuracy("snapkv+query-aware|none", "0.5") == 1.0
