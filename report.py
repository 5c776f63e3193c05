"""Summaries, tables and figures of evaluate.py and leak.py, made from their records.

Every mean comes with its standard error (SEM: sample standard deviation, ddof = 1, over
sqrt(n)) and the n behind it. The figures draw the SEM as error bars and say n in the
legend, so that a difference smaller than the bars reads as what it is: noise.

  evaluate_summary, print_evaluate, evaluate_figures   instruction following: Figs. 2, 3, 4, 8
  leak_summary, print_leak, leak_figures               leakage and remedies: Figs. 5, 8, trade-off,
                                                       composite gain
  token_keep_figure                                    Fig. 1: one system message, each token
                                                       shaded by how often it was kept
  query_aware_figure                                   both --query-aware modes overlaid
  ruler_summary, print_ruler, ruler_figures            retrieval (evaluate.py --data ruler:...):
                                                       accuracy vs r per task, facts vs haystack kept

A setting is read from its fields (summary.json's "settings": {label: fields}, setting.py), never
from its label: labels are keys and legends, for people.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import replace

import ifeval
import ruler
from setting import Setting

GAIN_RATIOS = (0.4, 0.5, 0.6, 0.7)      # the paper's composite gain averages over these ratios
SPANS = ("directive", "defense")


# ----------------------------------------------------------------------------- statistics

def mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 6) if xs else None


def sem(xs):
    """Standard error of the mean (ddof = 1); None for fewer than two values."""
    xs = [float(x) for x in xs if x is not None]
    return round(statistics.stdev(xs) / math.sqrt(len(xs)), 6) if len(xs) > 1 else None


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation with average ranks for ties; None when either side is constant."""
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        i = 0
        while i < len(xs):
            j = i
            while j + 1 < len(xs) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return round(cov / (va * vb) ** 0.5, 6) if va > 0 and vb > 0 else None


def setting_of(record: dict) -> str:
    return record.get("setting", f"{record['policy']}|{record['remedy']}")


def read_settings(settings: dict) -> dict[str, Setting]:
    """{label: Setting} from summary.json's {label: fields}."""
    return {label: Setting.from_fields(fields) for label, fields in settings.items()}


def find_setting(settings: dict[str, Setting], wanted) -> str | None:
    """The label of the first setting for which `wanted(setting)` holds, or None."""
    return next((label for label, setting in settings.items() if wanted(setting)), None)


def without_decoding(setting: Setting) -> Setting:
    return replace(setting, decode_target=None, decode_interval=None, decode_buffer=None, rerotate=False)


def group_by_setting(records: list[dict]) -> dict:
    """{setting: {ratio: [records]}}, both levels sorted: summaries come out in one order."""
    groups = {}
    for r in records:
        groups.setdefault(setting_of(r), {}).setdefault(r["ratio"], []).append(r)
    return {s: dict(sorted(by_ratio.items())) for s, by_ratio in sorted(groups.items())}


# ----------------------------------------------------------------------------- summaries

def accuracy(records: list[dict]) -> dict:
    """Prompt-level (over prompts) and instruction-level (over instruction verdicts) accuracy, strict and loose."""
    values = {"prompt_strict": [r["prompt_strict"] for r in records],
              "prompt_loose": [r["prompt_loose"] for r in records],
              "instruction_strict": [v for r in records for v in r["strict"]],
              "instruction_loose": [v for r in records for v in r["loose"]]}
    out = {"n_prompts": len(records), "n_instructions": len(values["instruction_strict"])}
    for name, xs in values.items():
        out[name], out[name + "_sem"] = mean(xs), sem(xs)
    return out


def family_verdicts(records: list[dict]) -> dict:
    """{family: [strict verdict of each instruction of that family]}, in IFEval's family order."""
    verdicts = defaultdict(list)
    for r in records:
        for instruction_id, ok in zip(r["instruction_ids"], r["strict"]):
            verdicts[ifeval.family(instruction_id)].append(ok)
    return {f: verdicts[f] for f in ifeval.FAMILIES if verdicts[f]}


def keep_rates(records: list[dict]) -> dict:
    """Mean keep rate of directive and defense over prompts, with SEM; with compression during
    decoding also at the end of generation (keep_end)."""
    values = {name: [r["keep"].get(name) for r in records] for name in SPANS}
    rates = {"keep": {name: mean(xs) for name, xs in values.items()},
             "keep_sem": {name: sem(xs) for name, xs in values.items()}}
    if any(r.get("keep_end") for r in records):
        at_end = {name: [r["keep_end"].get(name) for r in records if r.get("keep_end")] for name in SPANS}
        rates.update(keep_end={name: mean(xs) for name, xs in at_end.items()},
                     keep_end_sem={name: sem(xs) for name, xs in at_end.items()})
    return rates


def evaluate_summary(records: list[dict]) -> dict:
    """Per setting and ratio: accuracy, families, single vs multi, normalised, rank correlation, keep rates."""
    results = {}
    for setting, by_ratio in group_by_setting(records).items():
        rows = {}
        for ratio, recs in by_ratio.items():
            recs = sorted(recs, key=lambda r: r["key"])
            kinds = {"all": recs, "single": [r for r in recs if len(r["instruction_ids"]) == 1],
                     "multi": [r for r in recs if len(r["instruction_ids"]) > 1]}
            verdicts = {kind: family_verdicts(rs) for kind, rs in kinds.items()}
            rows[ratio] = {**accuracy(recs), "single": accuracy(kinds["single"]), "multi": accuracy(kinds["multi"]),
                           "families": {k: {f: mean(v) for f, v in fs.items()} for k, fs in verdicts.items()},
                           "families_sem": {k: {f: sem(v) for f, v in fs.items()} for k, fs in verdicts.items()},
                           "families_n": {k: {f: len(v) for f, v in fs.items()} for k, fs in verdicts.items()},
                           **keep_rates(recs)}
        base = rows.get(0.0)
        for row in rows.values():
            if base is None:
                continue
            row["normalized"] = {k: (round(row[k] / base[k], 6) if base[k] else None)
                                 for k in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")}
            row["normalized_families"] = {kind: {f: (round(a / base["families"][kind][f], 6) if base["families"][kind].get(f) else None)
                                                 for f, a in row["families"][kind].items()} for kind in ("single", "multi")}
            row["spearman"] = {}
            for kind in ("single", "multi"):
                common = sorted(set(row["families"][kind]) & set(base["families"][kind]))
                row["spearman"][kind] = spearman([base["families"][kind][f] for f in common],
                                                 [row["families"][kind][f] for f in common]) if len(common) > 2 else None
        results[setting] = {str(ratio): row for ratio, row in rows.items()}
    return {"results": results}


def leak_summary(records: list[dict], settings: dict) -> dict:
    """Per setting and ratio: leakage of the attack answers, directive following of the task answers, keep rates;
    the remedies' composite gains (`settings` = {label: fields} of the records' settings)."""
    results = {}
    for setting, by_ratio in group_by_setting(records).items():
        rows = {}
        for ratio, recs in by_ratio.items():
            tasks = sorted((r for r in recs if r["turn"] == "task"), key=lambda r: r["key"])
            attacks = [r for r in recs if r["turn"] != "task"]
            per_attack = defaultdict(list)
            for r in attacks:
                per_attack[r["turn"]].append(r["leaked"])
            recall = {k: [r["rouge_recall"][k] for r in attacks] for k in ("directive", "system", "defense")}
            leaked = [r["leaked"] for r in attacks]
            rows[str(ratio)] = {
                "directive_following": accuracy(tasks),
                "n_answers": len(attacks),
                "rouge_recall": {k: mean(xs) for k, xs in recall.items()},
                "rouge_recall_sem": {k: sem(xs) for k, xs in recall.items()},
                "leak_rate": mean(leaked),
                "leak_rate_sem": sem(leaked),
                "defense_success": None if not attacks else round(1 - mean(leaked), 6),
                "defense_success_sem": sem(leaked),
                "leak_rate_by_attack": {a: mean(xs) for a, xs in sorted(per_attack.items())},
                "leak_rate_by_attack_sem": {a: sem(xs) for a, xs in sorted(per_attack.items())},
                "leak_rate_by_attack_n": {a: len(xs) for a, xs in sorted(per_attack.items())},
                **keep_rates(tasks),
                "whitelist_kept": mean([r["whitelist_kept"] for r in tasks]),
                "whitelist_kept_sem": sem([r["whitelist_kept"] for r in tasks]),
            }
        results[setting] = rows
    return {"results": results, "composite_gain": composite_gains(results, settings, records)}


def composite_gains(results: dict, settings: dict, records: list[dict] | None = None) -> dict:
    """Per compression (policy, options, allocation, mode) and remedy: (accuracy gain + directive-recall drop)
    over the same compression with the remedy "none", averaged over GAIN_RATIOS.

    Accuracy = instruction-level strict directive following; leakage = mean ROUGE-L recall of the
    directive. Falls back to every r > 0 when none of GAIN_RATIOS was run (the ratios used are listed).
    `settings` = {label: fields}; gains are keyed by the compression's label and the remedy's name.
    With the `records`, also its standard error over the prompts, paired (prompt_gains) and n_prompts.
    """
    gains, known = {}, read_settings(settings)
    grouped = {label: {str(ratio): rs for ratio, rs in by_ratio.items()}         # keyed as `results` is
               for label, by_ratio in group_by_setting(records or []).items()}
    for label, rows in results.items():
        setting = known[label]
        plain_label = find_setting(known, lambda s: s.remedy.name == "none" and
                                   replace(s, remedy=setting.remedy) == setting)
        plain = results.get(plain_label)
        if setting.remedy.name == "none" or plain is None:
            continue
        shared = [r for r in rows if r in plain]
        chosen = [r for r in shared if float(r) in GAIN_RATIOS] or [r for r in shared if float(r) > 0]
        terms, per_prompt = [], defaultdict(list)
        for r in chosen:
            acc = rows[r]["directive_following"]["instruction_strict"], plain[r]["directive_following"]["instruction_strict"]
            leak = rows[r]["rouge_recall"]["directive"], plain[r]["rouge_recall"]["directive"]
            if None not in acc + leak:
                terms.append((acc[0] - acc[1]) + (leak[1] - leak[0]))
                if label in grouped:
                    for key, part in prompt_gains(grouped[label][r], grouped[plain_label][r]).items():
                        per_prompt[key].append(part)
        gain = {"gain": mean(terms), "ratios": [float(r) for r in chosen]}
        if records is not None:          # the gain is n x the mean part: its SEM n x the parts' SEM = sqrt(n) x SD
            parts = [sum(each) / len(each) for each in per_prompt.values()]
            gain.update(gain_sem=round(math.sqrt(len(parts)) * statistics.stdev(parts), 6) if len(parts) > 1 else None,
                        n_prompts=len(parts))
        gains.setdefault(setting.compression_label, {})[setting.remedy.name] = gain
    return gains


def prompt_gains(remedied: list[dict], plain: list[dict]) -> dict[str, float]:
    """Each prompt's part of one ratio's composite gain, which is their sum: its instructions' strict verdicts
    gained over all instructions, plus its attack answers' directive recall dropped over all attack answers."""
    def totals(records):
        tasks = [r for r in records if r["turn"] == "task"]
        attacks = [r for r in records if r["turn"] != "task"]
        follow = {r["key"]: sum(r["strict"]) for r in tasks}
        recall = defaultdict(float)
        for r in attacks:
            recall[r["key"]] += r["rouge_recall"]["directive"]
        return follow, recall, sum(len(r["strict"]) for r in tasks), len(attacks)
    (follow, recall, n_verdicts, n_answers), (follow0, recall0, _, _) = totals(remedied), totals(plain)
    return {key: (follow[key] - follow0[key]) / n_verdicts + (recall0[key] - recall[key]) / n_answers
            for key in follow}


# ----------------------------------------------------------------------------- tables

def pm(value, error=None, digits=2) -> str:
    """0.22±0.07; a bare mean when there is no SEM; '-' when there is no mean."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if error is None else f"{value:.{digits}f}±{error:.{digits}f}"


def print_columns(header: list[str], lines: list[list[str]], file):
    widths = [max(map(len, column)) for column in zip(header, *lines)]
    for line in [header, *lines]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))),
              file=file)


def print_evaluate(summary: dict, file=sys.stdout):
    lines = []
    for setting, rows in summary["results"].items():
        for ratio, row in rows.items():
            rho, keep = row.get("spearman", {}), row["keep"]
            single, multi = row["single"], row["multi"]
            lines.append([setting, f"{float(ratio):.2f}", str(row["n_prompts"]),
                          pm(row["prompt_strict"], row["prompt_strict_sem"]),
                          pm(row["instruction_strict"], row["instruction_strict_sem"]),
                          pm(row["instruction_loose"], row["instruction_loose_sem"]),
                          pm(single["instruction_strict"], single["instruction_strict_sem"]),
                          pm(multi["instruction_strict"], multi["instruction_strict_sem"]),
                          pm(rho.get("single")), pm(rho.get("multi")),
                          *(pm(keep[span], row["keep_sem"][span]) for span in SPANS)])
    print(file=file)
    print_columns(["setting", "r", "n", "P-str", "I-str", "I-lse", "single", "multi", "rho-s", "rho-m", "k-dir",
                   "k-def"], lines, file)
    print("mean±SEM over n prompts (P) or over their instructions (I, single, multi: instruction-level strict); "
          "str/lse = strict/loose;\nrho = Spearman of the family accuracies vs r = 0; k-dir/k-def = keep rate of "
          "directive/defense. summary.json holds every number.", file=file)


def print_leak(summary: dict, file=sys.stdout):
    lines = []
    for setting, rows in summary["results"].items():
        for ratio, row in rows.items():
            recall, recall_sem, follow = row["rouge_recall"], row["rouge_recall_sem"], row["directive_following"]
            lines.append([setting, f"{float(ratio):.2f}", str(row["n_answers"]),
                          *(pm(recall[k], recall_sem[k]) for k in ("directive", "system", "defense")),
                          pm(row["leak_rate"], row["leak_rate_sem"]), str(follow["n_prompts"]),
                          pm(follow["instruction_strict"], follow["instruction_strict_sem"]),
                          pm(follow["prompt_strict"], follow["prompt_strict_sem"]),
                          *(pm(row["keep"][span], row["keep_sem"][span]) for span in SPANS),
                          pm(row["whitelist_kept"], row["whitelist_kept_sem"])])
    print(file=file)
    print_columns(["setting", "r", "n", "R-dir", "R-sys", "R-def", "leak", "n-task", "I-str", "P-str", "k-dir",
                   "k-def", "wl"], lines, file)
    print("mean±SEM. R-* = ROUGE-L recall of directive/system/defense and leak = share of answers above the "
          "threshold,\nover the n attack answers; I-/P-str = directive following over the n-task task answers "
          "(instruction/prompt level, strict);\nk-* = keep rates; wl = share of whitelisted entries kept.", file=file)
    gains = summary["composite_gain"]
    if gains:
        remedies = sorted({r for g in gains.values() for r in g})
        print(f"\nComposite gain over the plain policy (accuracy gain + leakage drop, mean over r in "
              f"{', '.join(str(r) for r in GAIN_RATIOS)} where run; ±SEM over the prompts, paired)", file=file)
        print_columns(["policy", *remedies],
                      [[policy, *(pm(g[r]["gain"], g[r]["gain_sem"], digits=3) if r in g else "-" for r in remedies)]
                       for policy, g in gains.items()],
                      file)


# ----------------------------------------------------------------------------- figures: helpers

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out: str, name: str, tight: bool = True) -> str:
    """Write the figure under a temporary name, then rename it: a crash never leaves half a PNG."""
    path = os.path.join(out, name)
    if tight:
        fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    pyplot().close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def n_text(ns) -> str:
    """'n=32', or 'n=16-32' when points rest on different numbers."""
    ns = sorted({n for n in ns if n})
    return "n=0" if not ns else f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"


def offsets(n_lines: int, ratios: list[float]) -> list[float]:
    """Small x shifts that set n_lines curves side by side at each ratio, so equal values do not hide each other."""
    gaps = [b - a for a, b in zip(ratios, ratios[1:])] or [0.1]
    step = min(0.015, 0.5 * min(gaps) / max(n_lines - 1, 1))
    return [(i - (n_lines - 1) / 2) * step for i in range(n_lines)]


def curve(ax, xs, ys, errors, shift=0.0, **style):
    """One line with SEM error bars; a missing value leaves a gap."""
    ys = [math.nan if y is None else y for y in ys]
    errors = [0.0 if e is None else e for e in errors]
    ax.errorbar([x + shift for x in xs], ys, yerr=errors, capsize=2, elinewidth=0.8, markersize=4, **style)


def ratio_axis(ax, ratios, ylabel):
    ax.set_xticks(ratios)
    ax.set_xlabel("compression ratio r (curves shifted sideways so that equal values stay visible)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.03, 1.03)                    # a full axis: values at 0 or 1 stay visible off the frame
    ax.grid(alpha=0.3)


MARKERS = "osD^vPX*hp<>"


# ----------------------------------------------------------------------------- figures: instruction following

def evaluate_figures(summary: dict, records: list[dict], out: str, example: dict | None = None) -> list[str]:
    results, settings = summary["results"], read_settings(summary["settings"])
    written = []
    if results:
        written += [family_figure(results, out), rank_figure(results, out), accuracy_figure(results, out),
                    keep_figure(results, out), query_aware_figure(results, settings, out, EVALUATE_MODE_PANELS),
                    decode_figure(results, settings, out, leak=False)]
    if example:
        written.append(token_keep_figure(example, records, out))
    return [w for w in written if w]


def family_figure(results: dict, out: str) -> str:
    """Fig. 2: instruction accuracy per family vs r, single- vs multi-instruction prompts."""
    plt = pyplot()
    settings = list(results)
    fig, axes = plt.subplots(len(settings), 2, figsize=(12, 4.4 * len(settings)), squeeze=False)
    for row_axes, s in zip(axes, settings):
        rows = results[s]
        ratios = [float(r) for r in rows]
        shifts = offsets(len(ifeval.FAMILIES), ratios)
        for ax, kind in zip(row_axes, ("single", "multi")):
            for i, f in enumerate(ifeval.FAMILIES):
                ys = [rows[r]["families"][kind].get(f) for r in rows]
                if all(y is None for y in ys):
                    continue
                ns = [rows[r]["families_n"][kind].get(f) for r in rows]
                curve(ax, ratios, ys, [rows[r]["families_sem"][kind].get(f) for r in rows], shifts[i],
                      color=f"C{i}", marker=MARKERS[i], label=f"{f} ({n_text(ns)})")
            n_prompts = n_text(rows[r][kind]["n_prompts"] for r in rows)
            ax.set_title(f"{s}: {kind}-instruction prompts ({n_prompts} prompts)", fontsize=10)
            ratio_axis(ax, ratios, "instruction accuracy (strict), ±SEM")
            if ax.lines:
                ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                          title="family (n = instructions)", title_fontsize=7)
    return save_figure(fig, out, "fig2_family_accuracy.png")


def rank_figure(results: dict, out: str) -> str:
    """Fig. 3: Spearman correlation of the families' accuracies at r with those at r = 0."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    lines = [(s, kind) for s in results for kind in ("single", "multi")]
    all_ratios = sorted({float(r) for s in results for r in results[s]})
    shifts = offsets(len(lines), all_ratios)
    for i, (s, kind) in enumerate(lines):
        rows = results[s]
        ys = [rows[r].get("spearman", {}).get(kind) for r in rows]
        undefined = sum(y is None for y in ys)
        note = f", undefined at {undefined} of {len(ys)} r" if undefined else ""
        width = 1 + 2 * (len(lines) - 1 - i) / max(len(lines) - 1, 1)        # a line under another shows its edges
        curve(ax, [float(r) for r in rows], ys, [None] * len(ys), shifts[i], color=f"C{i // 2}", linewidth=width,
              linestyle="-" if kind == "single" else "--", marker=MARKERS[i % len(MARKERS)],
              label=f"{s} {kind} ({n_text(rows[r][kind]['n_prompts'] for r in rows)} prompts{note})")
    ax.set_title("Rank correlation of family accuracies with r = 0\n(undefined where every family scores alike)",
                 fontsize=10)
    ratio_axis(ax, all_ratios, "Spearman rho")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, out, "fig3_rank_correlation.png")


def accuracy_figure(results: dict, out: str) -> str:
    """Fig. 4: instruction-level accuracy vs r per setting, strict and loose, on the full 0-1 axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    all_ratios = sorted({float(r) for s in results for r in results[s]})
    shifts = offsets(2 * len(results), all_ratios)
    for i, (s, rows) in enumerate(results.items()):
        n = n_text(rows[r]["n_prompts"] for r in rows)
        for j, kind in enumerate(("strict", "loose")):
            key = f"instruction_{kind}"
            curve(ax, [float(r) for r in rows], [rows[r][key] for r in rows], [rows[r][key + "_sem"] for r in rows],
                  shifts[2 * i + j], color=f"C{i}", linestyle="-" if kind == "strict" else "--",
                  marker="o" if kind == "strict" else "s", label=f"{s} {kind} ({n} prompts)")
    ax.set_title("Instruction-level accuracy, ±SEM", fontsize=10)
    ratio_axis(ax, all_ratios, "accuracy")
    ax.legend(fontsize=7)
    return save_figure(fig, out, "fig4_average_accuracy.png")


def keep_figure(results: dict, out: str) -> str:
    """Fig. 8: keep rate of directive and defense vs r; an unbiased policy sits on 1 - r."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    all_ratios = sorted({float(r) for s in results for r in results[s]})
    ax.plot(all_ratios, [1 - r for r in all_ratios], ":", color="gray", label="unbiased: 1 - r")
    shifts = offsets(2 * len(results), all_ratios)
    for i, (s, rows) in enumerate(results.items()):
        for j, span in enumerate(SPANS):
            ys = [rows[r]["keep"][span] for r in rows]
            if all(y is None for y in ys):
                continue
            curve(ax, [float(r) for r in rows], ys, [rows[r]["keep_sem"][span] for r in rows], shifts[2 * i + j],
                  color=f"C{i}", linestyle="-" if span == "directive" else "--", marker="o" if j == 0 else "x",
                  label=f"{s} {span}")
    n = n_text(row.get("n_prompts") or row.get("directive_following", {}).get("n_prompts")
               for rows in results.values() for row in rows.values())
    ax.set_title(f"Eviction bias: share of each span kept, ±SEM over prompts ({n})", fontsize=10)
    ratio_axis(ax, all_ratios, "keep rate")
    ax.legend(fontsize=7)
    return save_figure(fig, out, "fig8_keep_rates.png")


# ----------------------------------------------------------------------------- figures: compression during decoding

def decode_curves(results: dict, settings: dict[str, Setting]) -> dict:
    """{(label of the setting without decoding, ratio): {decode target: summary row}} of the settings that
    compress during decoding."""
    curves = {}
    for label, rows in results.items():
        setting = settings[label]
        if setting.decode_target is None:
            continue
        for ratio, row in rows.items():
            curves.setdefault((without_decoding(setting).label, float(ratio)), {})[setting.decode_target] = row
    return {key: dict(sorted(by_target.items())) for key, by_target in sorted(curves.items())}


def decode_figure(results: dict, settings: dict[str, Setting], out: str, leak: bool) -> str | None:
    """Compression during decoding: what the answer keeps vs the decode target, and the directive and
    defense keep rates at the end of generation. One curve per setting and system-turn ratio r."""
    curves = decode_curves(results, settings)
    if not curves:
        return None
    plt = pyplot()
    panels = 3 if leak else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4))
    for i, ((setting, ratio), rows) in enumerate(curves.items()):
        targets = list(rows)
        label = f"{setting}, r={ratio:g}"
        if leak:
            n = n_text(row["n_answers"] for row in rows.values())
            curve(axes[0], targets, [row["rouge_recall"]["directive"] for row in rows.values()],
                  [row["rouge_recall_sem"]["directive"] for row in rows.values()], color=f"C{i}", marker="o",
                  label=f"{label} recall ({n})")
            curve(axes[0], targets, [row["leak_rate"] for row in rows.values()],
                  [row["leak_rate_sem"] for row in rows.values()], color=f"C{i}", marker="s", linestyle="--",
                  label=f"{label} leak rate")
        else:
            n = n_text(row["n_prompts"] for row in rows.values())
            curve(axes[0], targets, [row["instruction_strict"] for row in rows.values()],
                  [row["instruction_strict_sem"] for row in rows.values()], color=f"C{i}", marker="o",
                  label=f"{label} ({n} prompts)")
        if leak:
            curve(axes[1], targets, [row["directive_following"]["instruction_strict"] for row in rows.values()],
                  [row["directive_following"]["instruction_strict_sem"] for row in rows.values()],
                  color=f"C{i}", marker="o", label=label)
        for span, style in zip(SPANS, ("-", "--")):
            curve(axes[-1], targets, [row.get("keep_end", {}).get(span) for row in rows.values()],
                  [row.get("keep_end_sem", {}).get(span) for row in rows.values()], color=f"C{i}",
                  linestyle=style, marker="o" if span == "directive" else "x", label=f"{label} {span}")
    titles = (["Leakage: directive ROUGE-L recall (o) and leak rate (s), ±SEM", "Directive following "
               "(instruction, strict), ±SEM"] if leak else ["Instruction-level accuracy (strict), ±SEM"])
    for ax, title in zip(axes, titles + ["System turn kept at the end of generation, ±SEM"]):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("decode target (entries per KV head)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return save_figure(fig, out, "fig_decode.png")


# ----------------------------------------------------------------------------- figures: leakage

def compressions(results: dict, settings: dict[str, Setting]) -> list[str]:
    """The labels of the results' compressions (a setting without its remedy), sorted."""
    return sorted({settings[label].compression_label for label in results})


def leak_style(results: dict, settings: dict[str, Setting], label: str) -> dict:
    """Colour = compression (policy, options, allocation, mode), line and marker = remedy."""
    setting = settings[label]
    styles = {"none": ("-", "o"), "whitelist": ("--", "s"), "fair": (":", "^"), "both": ("-.", "D"),
              "protect": ((0, (6, 2, 1, 2, 1, 2)), "v")}
    line, marker = styles.get(setting.remedy.name, ("-", "o"))
    return dict(color=f"C{compressions(results, settings).index(setting.compression_label)}", linestyle=line,
                marker=marker)


def leak_figures(summary: dict, records: list[dict], out: str, example: dict | None = None) -> list[str]:
    results, settings = summary["results"], read_settings(summary["settings"])
    written = []
    if results:
        written += [leakage_figure(results, settings, out), keep_figure(results, out),
                    tradeoff_figure(results, settings, out), query_aware_figure(results, settings, out, LEAK_MODE_PANELS),
                    decode_figure(results, settings, out, leak=True)]
    if example:
        written.append(token_keep_figure(example, records, out))
    return [w for w in written if w]


def leakage_figure(results: dict, settings: dict[str, Setting], out: str) -> str:
    """Fig. 5: ROUGE-L recall of the directive and leak rate vs r, per policy and remedy."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    all_ratios = sorted({float(r) for s in results for r in results[s]})
    shifts = offsets(len(results), all_ratios)
    for i, (s, rows) in enumerate(results.items()):
        rs = [float(r) for r in rows]
        label = f"{s} ({n_text(rows[r]['n_answers'] for r in rows)} answers)"
        style = dict(label=label, **leak_style(results, settings, s))
        curve(ax1, rs, [rows[r]["rouge_recall"]["directive"] for r in rows],
              [rows[r]["rouge_recall_sem"]["directive"] for r in rows], shifts[i], **style)
        curve(ax2, rs, [rows[r]["leak_rate"] for r in rows], [rows[r]["leak_rate_sem"] for r in rows], shifts[i], **style)
    ax1.set_title("Leakage: ROUGE-L recall of the directive, ±SEM", fontsize=10)
    ratio_axis(ax1, all_ratios, "mean recall")
    ax2.set_title("Leak rate (recall > threshold), ±SEM", fontsize=10)
    ratio_axis(ax2, all_ratios, "share of answers")
    silent = [s for s, rows in results.items() if all(row["leak_rate"] == 0 for row in rows.values())]
    if silent:                                   # lines on the floor, named: they would hide under each other
        ax2.text(0.02, 0.97, "no leak at any r:\n" + "\n".join(silent), transform=ax2.transAxes, fontsize=7,
                 va="top", bbox=dict(facecolor="white", edgecolor="0.7", alpha=0.9))
    ax1.legend(fontsize=7)
    return save_figure(fig, out, "fig5_leakage.png")


def ratio_labels(points: list[tuple[float, float, float]], near: tuple[float, float]) -> list[tuple[float, float, str]]:
    """One label per cluster of (x, y, ratio) points closer than `near` = (dx, dy): 'r=0,0.5'."""
    clusters = []                                # [x, y, {ratios}]
    for x, y, r in points:
        cluster = next((c for c in clusters if abs(c[0] - x) < near[0] and abs(c[1] - y) < near[1]), None)
        if cluster:
            cluster[2].add(r)
        else:
            clusters.append([x, y, {r}])
    return [(x, y, "r=" + ",".join(f"{r:g}" for r in sorted(ratios))) for x, y, ratios in clusters]


def tradeoff_figure(results: dict, settings: dict[str, Setting], out: str) -> str:
    """Directive following vs leakage, one panel per compression (policy, options, allocation, mode), one point
    per ratio (nearby points share a label)."""
    plt = pyplot()
    policies = compressions(results, settings)
    remedies = sorted({settings[s].remedy.name for s in results}, key=lambda m: (m != "none", m))
    columns = min(3, len(policies))
    n_rows = math.ceil(len(policies) / columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.6 * columns, 4.2 * n_rows), squeeze=False)
    curves = {}                                  # setting: (xs, ys, xerr, yerr, ratios)
    for s, rows in results.items():
        follow = [rows[r]["directive_following"] for r in rows]
        curves[s] = ([rows[r]["rouge_recall"]["directive"] for r in rows], [f["instruction_strict"] for f in follow],
                     [rows[r]["rouge_recall_sem"]["directive"] or 0.0 for r in rows],
                     [f["instruction_strict_sem"] or 0.0 for f in follow], [float(r) for r in rows])
    ends = [(x - dx, x + dx, y - dy, y + dy) for xs, ys, xerr, yerr, _ in curves.values()
            for x, y, dx, dy in zip(xs, ys, xerr, yerr) if x is not None and y is not None] or [(0, 1, 0, 1)]
    x_lim = (max(-0.03, min(e[0] for e in ends) - 0.05), min(1.03, max(e[1] for e in ends) + 0.05))
    y_lim = (max(-0.03, min(e[2] for e in ends) - 0.05), min(1.03, max(e[3] for e in ends) + 0.05))
    for ax, policy in zip(axes.flat, policies):
        points = []                              # (x, y, ratio) of every point, for the labels
        for s, (xs, ys, xerr, yerr, ratios) in curves.items():
            if settings[s].compression_label != policy:
                continue
            remedy = settings[s].remedy.name
            style = leak_style(results, settings, s)
            style["color"] = f"C{remedies.index(remedy)}"                  # colour = remedy inside a policy's panel
            rows = results[s]
            n = (f"{n_text(rows[r]['directive_following']['n_prompts'] for r in rows)} tasks, "
                 f"{n_text(rows[r]['n_answers'] for r in rows)} attacks")
            ax.errorbar([math.nan if x is None else x for x in xs], [math.nan if y is None else y for y in ys],
                        xerr=xerr, yerr=yerr, capsize=2, elinewidth=0.7, markersize=4, label=f"{remedy} ({n})", **style)
            points += [(x, y, r) for x, y, r in zip(xs, ys, ratios) if x is not None and y is not None]
        near = (0.06 * (x_lim[1] - x_lim[0]), 0.04 * (y_lim[1] - y_lim[0]))
        for x, y, text in ratio_labels(points, near):
            ax.annotate(text, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points", color="0.2")
        ax.set(xlim=x_lim, ylim=y_lim, xlabel="leakage (directive ROUGE-L recall)",
               ylabel="directive accuracy (instruction, strict)")
        ax.set_title(policy, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(policies):]:
        ax.axis("off")
    fig.suptitle("Trade-off: directive following vs leakage, ±SEM (labels: r)", fontsize=10)
    return save_figure(fig, out, "fig_tradeoff.png")


# ----------------------------------------------------------------------------- the two --query-aware modes

# (title, y label, row -> (mean, SEM, n)) of each panel
EVALUATE_MODE_PANELS = [
    ("Instruction-level accuracy (strict), ±SEM", "accuracy",
     lambda row: (row["instruction_strict"], row["instruction_strict_sem"], row["n_prompts"])),
    ("Keep rate of the defense, ±SEM", "keep rate",
     lambda row: (row["keep"]["defense"], row["keep_sem"]["defense"], row["n_prompts"])),
]
LEAK_MODE_PANELS = [
    ("Directive following (instruction, strict), ±SEM", "accuracy",
     lambda row: (row["directive_following"]["instruction_strict"], row["directive_following"]["instruction_strict_sem"],
                  row["directive_following"]["n_prompts"])),
    ("Leakage: ROUGE-L recall of the directive, ±SEM", "mean recall",
     lambda row: (row["rouge_recall"]["directive"], row["rouge_recall_sem"]["directive"], row["n_answers"])),
    ("Leak rate (recall > threshold), ±SEM", "share of answers",
     lambda row: (row["leak_rate"], row["leak_rate_sem"], row["n_answers"])),
]


def query_aware_figure(results: dict, settings: dict[str, Setting], out: str, panels: list) -> str | None:
    """Each setting run in both modes, one colour: the system turn compressed alone (solid) and together with
    the user turn (--query-aware, dashed), vs r. None when no setting ran in both modes."""
    pairs = {}                                   # {label alone: label with the user turn}
    for aware in (label for label in results if settings[label].query_aware):
        alone = find_setting(settings, lambda s: s == replace(settings[aware], query_aware=False))
        if alone in results:
            pairs[alone] = aware
    if not pairs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.6), squeeze=False)
    all_ratios = sorted({float(r) for s in results for r in results[s]})
    shifts = offsets(2 * len(pairs), all_ratios)
    for ax, (title, ylabel, value) in zip(axes[0], panels):
        for i, pair in enumerate(pairs.items()):
            for j, s in enumerate(pair):
                rows = results[s]
                ys, errors, ns = zip(*(value(rows[r]) for r in rows))
                mode = "with the user turn" if j else "system turn alone"
                curve(ax, [float(r) for r in rows], ys, errors, shifts[2 * i + j], color=f"C{i}",
                      linestyle="--" if j else "-", marker="s" if j else "o",
                      label=f"{pair[0]} {mode} ({n_text(ns)})")
        ax.set_title(title, fontsize=10)
        ratio_axis(ax, all_ratios, ylabel)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Query-aware compression: solid = the system turn compressed alone, dashed = with the user turn",
                 fontsize=10)
    return save_figure(fig, out, "fig_query_aware.png")


# ----------------------------------------------------------------------------- Fig. 1: keep rate token by token

CHARS_PER_LINE = 100
FONT_SIZE = 7.5                                  # points; DejaVu Sans Mono is 0.602 em wide per character
CHAR_INCHES = 0.602 * FONT_SIZE / 72
LINE_INCHES = 0.21
SPAN_COLOURS = {"directive": "#2166ac", "defense": "#1b7837"}


def wrap_pieces(pieces: list[str], width: int = CHARS_PER_LINE) -> tuple[list[tuple[int, int, str]], int]:
    """(line, column, shown text) of each token, wrapped at `width` characters, and the number of lines.

    A newline shows as ↵ and ends the line; a token with no visible text shows as a dot.
    """
    placed, line, column = [], 0, 0
    for piece in pieces:
        shown = "".join(c if c.isprintable() else "↵" if c == "\n" else " " for c in piece) or "·"
        if column + len(shown) > width and column > 0:
            line, column = line + 1, 0
        placed.append((line, column, shown))
        column += len(shown)
        if "\n" in piece:
            line, column = line + 1, 0
    return placed, (line + 1 if column else line) or 1


def pick_rows(example: dict, records: list[dict], ratio: float | None):
    """The chosen ratio and {setting: token keep rates} of the example's prompt; (None, {}) when none fit."""
    n_tokens = len(example["pieces"])
    mine = [r for r in records if r.get("key") == example["key"] and len(r.get("token_keep") or ()) == n_tokens]
    if ratio is None:
        run = sorted({r["ratio"] for r in mine if r["ratio"] > 0})
        if not run:
            return None, {}
        ratio = min(run, key=lambda r: (abs(r - 0.5), r))
    rows = {}
    by_policy = lambda r: (r["policy"], r["remedy"] != "none", setting_of(r))     # the plain policy first
    for r in sorted(mine, key=by_policy):
        if abs(r["ratio"] - ratio) < 1e-9:
            rows.setdefault(setting_of(r), r["token_keep"])    # leak.py: every answer of a job has the same
    return ratio, rows


def token_keep_figure(example: dict, records: list[dict], out: str, ratio: float | None = None) -> str | None:
    """Fig. 1: the example's system message, each token shaded by its keep rate, one row per setting.

    `example` = {"key": prompt key, "pieces": the system turn's token texts, "spans": {"directive": [(start,
    end)], "defense": [...]}} (token spans); records carry "token_keep", one rate per system token.
    `ratio` defaults to the run's ratio closest to 0.5 (above 0). Returns None when nothing fits.
    """
    ratio, rows = pick_rows(example, records, ratio)
    if not rows:
        return None
    plt = pyplot()
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import Patch, Rectangle
    shade = LinearSegmentedColormap.from_list("keep", ["#d7301f", "#fdae61", "#ffffff"])   # 0 evicted ... 1 kept
    placed, n_lines = wrap_pieces(example["pieces"])
    span_of = {}
    for name in SPANS:
        for start, end in example["spans"].get(name, ()):
            span_of.update({i: name for i in range(start, end)})

    title_in, header_in, margin_in = 0.32, 0.75, 0.25
    panel_in = title_in + n_lines * LINE_INCHES
    width_in = CHARS_PER_LINE * CHAR_INCHES + 2 * margin_in
    height_in = header_in + len(rows) * panel_in + margin_in
    fig = plt.figure(figsize=(width_in, height_in))
    box = lambda left, top, w, h: [left / width_in, 1 - (top + h) / height_in, w / width_in, h / height_in]

    for k, (setting, keep) in enumerate(rows.items()):
        ax = fig.add_axes(box(margin_in, header_in + k * panel_in + title_in, CHARS_PER_LINE * CHAR_INCHES,
                              n_lines * LINE_INCHES))
        ax.set_xlim(0, CHARS_PER_LINE)
        ax.set_ylim(n_lines, 0)
        ax.axis("off")
        for i, (line, column, text) in enumerate(placed):
            ax.add_patch(Rectangle((column, line + 0.04), len(text), 0.72, facecolor=shade(keep[i]), linewidth=0))
            if i in span_of:
                ax.add_patch(Rectangle((column, line + 0.78), len(text), 0.14, facecolor=SPAN_COLOURS[span_of[i]],
                                       linewidth=0))
            ax.text(column, line + 0.42, text, fontsize=FONT_SIZE, family="DejaVu Sans Mono", va="center",
                    ha="left", parse_math=False)
        kept = {name: mean([keep[i] for i, s in span_of.items() if s == name]) for name in SPANS}
        summary = ", ".join(f"{name} {kept[name]:.0%}" for name in SPANS if kept[name] is not None)
        ax.set_title(f"{setting}: kept {summary}", fontsize=9, loc="left", pad=3)

    fig.text(margin_in / width_in, 1 - 0.22 / height_in, f"Prompt {example['key']} at r = {ratio:g}: "
             "each token shaded by its keep rate", fontsize=10, va="center")
    colour_bar = fig.add_axes(box(margin_in, 0.42, 2.6, 0.12))
    fig.colorbar(plt.cm.ScalarMappable(cmap=shade), cax=colour_bar, orientation="horizontal")
    colour_bar.tick_params(labelsize=7)
    colour_bar.set_title("keep rate (share of layers x KV heads that keep the token)", fontsize=7, loc="left", pad=2)
    fig.legend(handles=[Patch(color=c, label=f"{name} (underline)") for name, c in SPAN_COLOURS.items()],
               loc="upper right", bbox_to_anchor=(1 - margin_in / width_in, 1 - 0.3 / height_in), fontsize=7,
               ncol=2, frameon=False)
    return save_figure(fig, out, "fig1_token_keep.png", tight=False)


# ----------------------------------------------------------------------------- retrieval: RULER's tasks

RULER_SPANS = ("facts", "haystack", "distractors", "instruction", "example")   # the keep rates' names, in this order


def span_rates(records: list[dict], field: str = "keep") -> dict:
    """Mean keep rate of each named span of RULER prompts over the records, with SEM (`field`: "keep" after the
    prefill's compression, "keep_end" at the end of generation with compression during decoding)."""
    rated = [r[field] for r in records if r.get(field)]
    names = [name for name in RULER_SPANS if any(k.get(name) is not None for k in rated)]
    values = {name: [k.get(name) for k in rated] for name in names}
    return {field: {name: mean(xs) for name, xs in values.items()},
            field + "_sem": {name: sem(xs) for name, xs in values.items()}}


def ruler_summary(records: list[dict]) -> dict:
    """Per setting and ratio: accuracy (RULER's string match) per task with SEM and n, their average (RULER's
    score: the mean over tasks; its SEM from the tasks' SEMs), and the keep rates of facts, haystack, ..."""
    tasks = [task for task in ruler.TASKS if any(r["task"] == task for r in records)]
    results = {}
    for setting, by_ratio in group_by_setting(records).items():
        rows = {}
        for ratio, recs in by_ratio.items():
            per_task = {}
            for task in tasks:
                mine = [r for r in recs if r["task"] == task]
                if mine:
                    scores = [r["score"] for r in mine]
                    per_task[task] = {"score": mean(scores), "score_sem": sem(scores), "n": len(mine),
                                      **span_rates(mine)}
            sems = [t["score_sem"] for t in per_task.values()]
            average_sem = (round(math.sqrt(sum(e * e for e in sems)) / len(sems), 6)
                           if None not in sems else None)
            rows[str(ratio)] = {"tasks": per_task, "average": mean([t["score"] for t in per_task.values()]),
                                "average_sem": average_sem, "n_prompts": len(recs), **span_rates(recs)}
            if any(r.get("keep_end") for r in recs):
                rows[str(ratio)].update(span_rates(recs, "keep_end"))
        results[setting] = rows
    return {"results": results, "tasks": tasks}


def print_ruler(summary: dict, file=sys.stdout):
    results, tasks = summary["results"], summary["tasks"]
    ratios = sorted({float(r) for rows in results.values() for r in rows})
    row_of = lambda rows, r: next((row for key, row in rows.items() if float(key) == r), None)   # noqa: E731
    lines = []
    for setting, rows in results.items():
        for task in tasks + (["average"] if len(tasks) > 1 else []):
            cells = []
            for r in ratios:
                row = row_of(rows, r)
                cell = None if row is None else (
                    {"score": row["average"], "score_sem": row["average_sem"]} if task == "average"
                    else row["tasks"].get(task))
                cells.append(pm(cell["score"], cell["score_sem"]) if cell else "-")
            ns = [row["n_prompts"] if task == "average" else row["tasks"].get(task, {}).get("n")
                  for row in rows.values()]
            lines.append([setting, task, n_text(ns)[2:], *cells])
    print(file=file)
    print_columns(["setting", "task", "n", *(f"r={r:g}" for r in ratios)], lines, file)
    print("accuracy: RULER's string match (share of the expected strings in the answer), mean±SEM over the n "
          "prompts;\naverage: the mean over tasks (RULER's score).", file=file)
    keep_lines = []
    for setting, rows in results.items():
        cells = []
        for r in ratios:
            row = row_of(rows, r)
            cells.append("/".join(pm(row["keep"].get(s), row["keep_sem"].get(s)) for s in ("facts", "haystack"))
                         if row else "-")
        keep_lines.append([setting, *cells])
    print(file=file)
    print_columns(["setting (keep facts/haystack)", *(f"r={r:g}" for r in ratios)], keep_lines, file)
    print("keep rate: the share of a span's entries kept (over layers and KV heads), mean±SEM over prompts; an "
          "unbiased policy keeps 1 - r of both. summary.json holds every number.", file=file)


RULER_MODE_PANELS = [
    ("Accuracy (RULER's string match, mean over tasks), ±SEM", "accuracy",
     lambda row: (row["average"], row["average_sem"], row["n_prompts"])),
    ("Keep rate of the facts, ±SEM", "keep rate",
     lambda row: (row["keep"].get("facts"), row["keep_sem"].get("facts"), row["n_prompts"])),
]


def ruler_figures(summary: dict, records: list[dict], out: str, example: dict | None = None) -> list[str]:
    results, settings = summary["results"], read_settings(summary["settings"])
    written = []
    if results:
        written += [ruler_accuracy_figure(results, summary["tasks"], out), ruler_keep_figure(results, out),
                    query_aware_figure(results, settings, out, RULER_MODE_PANELS)]
    if example:
        written.append(context_keep_figure(example, records, out))
    return [w for w in written if w]


def ruler_accuracy_figure(results: dict, tasks: list[str], out: str) -> str:
    """Accuracy vs r, one panel per task (and their average), one curve per setting, ±SEM."""
    plt = pyplot()
    panels = tasks + (["average"] if len(tasks) > 1 else [])
    columns = min(4, len(panels))
    n_rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.4 * columns, 3.8 * n_rows), squeeze=False)
    all_ratios = sorted({float(r) for s in results for r in results[s]})
    shifts = offsets(len(results), all_ratios)
    for ax, panel in zip(axes.flat, panels):
        ns = []
        for i, (s, rows) in enumerate(results.items()):
            if panel == "average":
                points = [(float(r), row["average"], row["average_sem"], row["n_prompts"]) for r, row in rows.items()]
            else:
                points = [(float(r), row["tasks"][panel]["score"], row["tasks"][panel]["score_sem"],
                           row["tasks"][panel]["n"]) for r, row in rows.items() if panel in row["tasks"]]
            if not points:
                continue
            xs, ys, errors, n = zip(*points)
            ns += n
            curve(ax, xs, ys, errors, shifts[i], color=f"C{i}", marker=MARKERS[i % len(MARKERS)], label=s)
        ax.set_title(f"{panel} ({n_text(ns)} per point)", fontsize=9)
        ratio_axis(ax, all_ratios, "accuracy, ±SEM")
        ax.set_xlabel("compression ratio r")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Retrieval under compression: RULER's string match vs r\n(curves shifted sideways so that "
                 "equal values stay visible)", fontsize=9)
    return save_figure(fig, out, "fig_ruler_accuracy.png")


def ruler_keep_figure(results: dict, out: str) -> str:
    """The facts' and the haystack's keep rates vs r, per setting: the eviction bias of retrieval."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    all_ratios = sorted({float(r) for s in results for r in results[s]})
    ax.plot(all_ratios, [1 - r for r in all_ratios], ":", color="gray", label="unbiased: 1 - r")
    shifts = offsets(2 * len(results), all_ratios)
    for i, (s, rows) in enumerate(results.items()):
        for j, span in enumerate(("facts", "haystack")):
            curve(ax, [float(r) for r in rows], [row["keep"].get(span) for row in rows.values()],
                  [row["keep_sem"].get(span) for row in rows.values()], shifts[2 * i + j], color=f"C{i}",
                  linestyle="-" if j == 0 else "--", marker="o" if j == 0 else "x", label=f"{s} {span}")
    n = n_text(row["n_prompts"] for rows in results.values() for row in rows.values())
    ax.set_title(f"Share of the facts and of the haystack kept, ±SEM over prompts ({n})", fontsize=10)
    ratio_axis(ax, all_ratios, "keep rate")
    ax.legend(fontsize=7)
    return save_figure(fig, out, "fig_ruler_keep.png")


def context_keep_figure(example: dict, records: list[dict], out: str, ratio: float | None = None) -> str | None:
    """One prompt's keep rate token by token along its context, one panel per setting, the facts shaded: where
    each policy keeps and where the needle lies. `example` as token_keep_figure's (its spans: "facts", ...);
    `ratio` defaults to the run's ratio closest to 0.5 (above 0). None when nothing fits."""
    ratio, rows = pick_rows(example, records, ratio)
    if not rows:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 1, figsize=(11, 0.6 + 1.5 * len(rows)), sharex=True, squeeze=False)
    colours = {"facts": "#d7301f", "distractors": "#fdae61", "instruction": "#9ecae1", "example": "#c7e9c0"}
    for ax, (setting, keep) in zip(axes[:, 0], rows.items()):
        for name, colour in colours.items():
            for k, (start, end) in enumerate(example["spans"].get(name, ())):
                ax.axvspan(start - 0.5, end - 0.5, color=colour, alpha=0.6, linewidth=0,
                           label=name if k == 0 else None)
        ax.step(range(len(keep)), keep, where="mid", color="black", linewidth=0.7)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("keep rate", fontsize=7)
        ax.set_title(setting, fontsize=8, loc="left")
    axes[0, 0].legend(fontsize=7, loc="upper right", ncol=4)
    axes[-1, 0].set_xlabel("position in the system turn (tokens)")
    fig.suptitle(f"Prompt {example['key']} at r = {ratio:g}: the share of layers x KV heads keeping each token",
                 fontsize=9)
    return save_figure(fig, out, "fig_ruler_context_keep.png")
