"""evaluate.py and leak.py: flags, summaries, resume, remedies, bad input."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from flags import UsageError, parse_option_value, parse_policies, parse_ratios
from report import composite_gains, evaluate_summary, spearman
from setting import Remedy, Setting


def test_parse_ratios():
    assert parse_ratios("0:0.9:0.1") == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert parse_ratios("0.5,0,0.25") == [0.0, 0.25, 0.5]
    for bad in ("0,1", "-0.1", "x", "0:1:0.5", "0:0.5:0"):
        with pytest.raises(UsageError):
            parse_ratios(bad)
    for minus_zero in ("-0,0.5", "-0:0.5:0.5"):       # -0 is 0: the same job keys and labels as 0 (a resume)
        assert [str(r) for r in parse_ratios(minus_zero)] == ["0.0", "0.5"]
    assert str(parse_option_value("-0", 1.0)) == "0.0"


def test_parse_policies_lists_the_choices():
    assert parse_policies("tova, snapkv") == ["tova", "snapkv"]
    with pytest.raises(UsageError, match="choose from streaming_llm"):
        parse_policies("tova,h3o")


def test_spearman_with_ties_and_constants():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / 22.5 ** 0.5, abs=1e-6)  # ranks 0,1.5,1.5,3
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def _record(key, ratio, ids, strict, keep=(1.0, 1.0)):
    return dict(setting="tova|none", policy="tova", remedy="none", ratio=ratio, key=key, instruction_ids=ids, strict=strict, loose=strict,
                prompt_strict=all(strict), prompt_loose=all(strict), keep={"directive": keep[0], "defense": keep[1]})


def test_accuracy_summary_by_hand():
    records = [_record("a", 0.0, ["keywords:existence"], [True]),
               _record("b", 0.0, ["punctuation:no_comma", "change_case:english_lowercase"], [True, False]),
               _record("a", 0.5, ["keywords:existence"], [False], keep=(0.8, 0.2)),
               _record("b", 0.5, ["punctuation:no_comma", "change_case:english_lowercase"], [True, True], keep=(0.6, 0.4))]
    rows = evaluate_summary(records)["results"]["tova|none"]
    assert rows["0.0"]["prompt_strict"] == 0.5 and rows["0.0"]["instruction_strict"] == pytest.approx(2 / 3)
    assert rows["0.5"]["single"]["instruction_strict"] == 0.0 and rows["0.5"]["multi"]["prompt_strict"] == 1.0
    assert rows["0.5"]["families"]["multi"] == {"change_case": 1.0, "punctuation": 1.0}
    assert rows["0.5"]["normalized"]["instruction_strict"] == pytest.approx(1.0)
    assert rows["0.5"]["keep"] == {"directive": 0.7, "defense": 0.3}


def test_composite_gain_by_hand():
    row = lambda acc, leak: {"directive_following": {"instruction_strict": acc}, "rouge_recall": {"directive": leak}}
    results = {"snapkv|none": {"0.0": row(0.5, 0.1), "0.5": row(0.4, 0.5), "0.6": row(0.3, 0.6)},
               "snapkv|fair": {"0.0": row(0.5, 0.1), "0.5": row(0.45, 0.2), "0.6": row(0.3, 0.4)}}
    settings = {s.label: s.fields() for s in (Setting("snapkv"), Setting("snapkv", remedy=Remedy("fair", fair="defense")))}
    gain = composite_gains(results, settings)["snapkv"]["fair"]
    assert gain["ratios"] == [0.5, 0.6] and gain["gain"] == pytest.approx(((0.05 + 0.3) + (0.0 + 0.2)) / 2)


# ----------------------------------------------------------------------------- command line, end to end

def run(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.parametrize("args, message", [
    (["--policy", "nope"], "unknown policy 'nope'"),
    (["--ratios", "0,1.0"], "outside [0, 1)"),
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--whitelist", "NOT IN ANY PROMPT", "--limit", "1"], "not in the system message"),
    (["--data", "BAD"], "field"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, default_model_folder, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": 1, "instruction_id_list": ["keywords:existence"], "kwargs": [{}], "messages": "oops"}\n')
    args = [str(bad) if a == "BAD" else a for a in args]
    out = tmp_path / "out"
    result = run("evaluate.py", *args, "--out", str(out))
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_leak_bad_attack_file(tmp_path, default_model_folder):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for attack, message in ((str(tmp_path / "missing.txt"), "not found"), (str(empty), "empty")):
        result = run("leak.py", "--attack", attack, "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and message in result.stderr and not (tmp_path / "out").exists()


SMALL = ["--policy", "streaming_llm", "--ratios", "0,0.5", "--limit", "3", "--max-new-tokens", "8", "--batch-size", "2"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, default_model_folder):
    out = tmp_path_factory.mktemp("evaluate") / "run"
    result = run("evaluate.py", *SMALL, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_evaluate_writes_records_summary_and_figures(evaluated):
    out, result = evaluated
    records = [json.loads(line) for line in open(out / "responses.jsonl")]
    assert len(records) == 6 and {r["ratio"] for r in records} == {0.0, 0.5}
    summary = json.load(open(out / "summary.json"))
    assert set(summary["results"]["streaming_llm|none"]) == {"0.0", "0.5"}
    for name in ("fig2_family_accuracy.png", "fig3_rank_correlation.png", "fig4_average_accuracy.png", "fig8_keep_rates.png"):
        assert (out / name).stat().st_size > 1000
    assert "streaming_llm|none" in result.stdout
    row = summary["results"]["streaming_llm|none"]["0.5"]["keep"]
    assert row["directive"] > row["defense"]                        # StreamingLLM's recency bias, defense first


def test_resume_after_a_crash_gives_the_same_summary(evaluated, tmp_path):
    out, _ = evaluated
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    lines = open(out / "responses.jsonl").read().splitlines(keepends=True)
    (resumed / "run.json").write_text(open(out / "run.json").read())
    (resumed / "responses.jsonl").write_text("".join(lines[:3]) + lines[3][:40])   # killed mid-record
    result = run("evaluate.py", *SMALL, "--out", str(resumed))
    assert result.returncode == 0 and "resuming: 3 of 6" in result.stderr
    assert open(resumed / "summary.json").read() == open(out / "summary.json").read()
    key = lambda line: json.loads(line)["job"]
    assert sorted(open(resumed / "responses.jsonl"), key=key) == sorted(lines, key=key)  # same answers


def test_a_folder_with_other_settings_is_refused(evaluated):
    out, _ = evaluated
    before = open(out / "responses.jsonl").read()
    result = run("evaluate.py", *SMALL[:-2], "--batch-size", "3", "--out", str(out))
    assert result.returncode == 2 and "other settings (batch_size)" in result.stderr
    assert open(out / "responses.jsonl").read() == before


def test_leak_remedies(tmp_path, default_model_folder):
    out = tmp_path / "leak"
    result = run("leak.py", "--policy", "snapkv", "--remedy", "none,whitelist,fair", "--ratios", "0.5,0.9",
                 "--limit", "2", "--max-new-tokens", "8", "--attack", "repeat-previous", "--attack", "list-rules",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in open(out / "records.jsonl")]
    assert len(records) == 3 * 2 * 2 * 3                             # remedies x ratios x prompts x (task + 2 attacks)
    for r in records:
        if r["turn"] != "task":
            assert set(r["rouge_recall"]) == {"directive", "system", "defense"} and r["directive"] and r["user"]
            assert r["leaked"] == (r["rouge_recall"]["directive"] > 0.3)
        if r["remedy"] == "whitelist":
            budget_allows = r["n_kept"] >= 40                        # the built-in must-keep phrase is < 40 tokens
            assert (r["whitelist_kept"] == 1.0) or not budget_allows
            assert r["whitelist_kept"] is not None
        if r["remedy"] == "fair":
            kept_share = r["n_kept"] / r["system_tokens"]
            rates = r["keep"]["partitions"]
            assert len(rates) == 2 and all(abs(rate - kept_share) < 0.05 for rate in rates)
    summary = json.load(open(out / "summary.json"))
    assert set(summary["composite_gain"]["snapkv"]) == {"whitelist", "fair"}
    for name in ("fig5_leakage.png", "fig8_keep_rates.png", "fig_tradeoff.png"):
        assert (out / name).stat().st_size > 1000


def test_policy_settings_come_from_the_score_functions():
    from flags import parse_policy_options, policy_settings
    assert policy_settings("snapkv") == {"window": 16, "kernel": 5}
    assert policy_settings("h2o") == {"block": 32}                  # `received` comes from the prefill, not a flag
    assert policy_settings("tova") == {}
    options = parse_policy_options(["window=32", "n_sink=2"], ["snapkv", "streaming_llm", "knorm"])
    assert options == {"snapkv": {"window": 32}, "streaming_llm": {"n_sink": 2}, "knorm": {}}
    with pytest.raises(UsageError, match="h2o fails with it"):
        parse_policy_options(["block=0"], ["h2o"])


def test_allocation_settings_come_from_the_allocation_functions():
    from flags import allocation_settings, parse_allocation_options
    assert allocation_settings("uniform") == {}
    assert allocation_settings("pyramid") == {"window": 16, "beta": 20}
    assert allocation_settings("adakv") == {"alpha": 0.2}
    options = parse_allocation_options(["alpha=0.1", "window=8"], ["uniform", "pyramid", "adakv"])
    assert options == {"uniform": {}, "pyramid": {"window": 8}, "adakv": {"alpha": 0.1}}
    with pytest.raises(UsageError, match="no chosen allocation takes it"):
        parse_allocation_options(["alpha=0.1"], ["uniform", "pyramid"])
    with pytest.raises(UsageError, match="pyramid fails with it"):
        parse_allocation_options(["beta=0"], ["pyramid"])


def test_a_setting_label_is_made_from_its_fields():
    assert Setting("snapkv").label == "snapkv|none"
    assert Setting("snapkv", {"window": 32, "kernel": 3}, Remedy("whitelist")).label == "snapkv[kernel=3,window=32]|whitelist"
    assert Setting("snapkv", allocation="adakv", allocation_options={"alpha": 0.1}).label == "snapkv@adakv[alpha=0.1]|none"
    assert Setting("knorm", decode_target=64, decode_interval=16, decode_buffer=16).label == "knorm~decode64|none"
    assert Setting("snapkv", query_aware=True).compression_label == "snapkv+query-aware"
    setting = Setting("snapkv", {"window": 8}, Remedy("fair", ["defense"], "defense", 0.5, 2), "pyramid", {"beta": 10})
    assert Setting.from_fields(json.loads(json.dumps(setting.fields()))) == setting       # through summary.json
