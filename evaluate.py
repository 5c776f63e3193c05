"""Instruction following under KV-cache compression (the paper's Pitfalls 1, 2, 4 and 5).

For each policy, ratio and prompt: compress the system turn (which holds the
instructions), answer the user's task from the compressed cache, and check the answer
with the IFEval checks. Reproduces, on whatever model you point it at:

  Fig. 2  per-family accuracy vs ratio, single- vs multi-instruction prompts
  Fig. 3  Spearman rank correlation of the families' accuracies at r vs at r = 0
  Fig. 4  average accuracy vs ratio per policy
  Fig. 8  keep rate of the directive vs the defense (eviction bias)

The defaults (--preset demo) take about 2 minutes on a 2-core CPU: the bundled 135M model,
24 built-in prompts, StreamingLLM and TOVA at 3 ratios, 64 new tokens. --preset full runs
all five policies on all 155 built-in prompts at 4 ratios (about an hour there). The
paper's full run:

  python evaluate.py --model weights/Llama-3.1-8B-Instruct --data sys_ifeval.jsonl --defense none \\
      --policy streaming_llm,h2o,knorm,snapkv,tova --ratios 0:0.9:0.1 --limit 0 \\
      --max-new-tokens 1280 --device cuda --dtype bfloat16 --batch-size 16

Outputs in --out: responses.jsonl (one record per policy, ratio and prompt, appended as it
goes: rerun the same command to resume), summary.json, and fig*.png.
"""
from __future__ import annotations

import sys
from collections import defaultdict

import ifeval
import prompts as P
from experiment import (Design, Experiment, Remedy, UsageError, accuracy, fmt, group_by_setting, main_guard, mean,
                        plot_keep_rates, run, save_figure)

DEFAULTS = dict(policy="streaming_llm,tova", ratios="0,0.5,0.75", defense="defense-first", limit=24,
                max_new_tokens=64, dtype="float32", batch_size=8, out="runs/evaluate")
PRESETS = {"demo": {},
           "full": dict(policy="streaming_llm,h2o,knorm,snapkv,tova", ratios="0,0.25,0.5,0.75", limit=0,
                        max_new_tokens=96)}


def add_arguments(parser):
    parser.add_argument("--order", choices=["given", "reversed"], default="given",
                        help="instruction order inside the directive (built-in prompts; Pitfall 4)")


def remedy_label(args) -> str:
    parts = []
    if args.whitelist:
        parts.append("whitelist")
    if args.fair != "none":
        parts.append(f"fair-{args.fair}" + (f"-debias{args.debias:g}" if args.debias < 1 else ""))
    return "+".join(parts) or "none"


def design(args, prompts: list[P.Prompt]) -> Design:
    """One remedy for every policy, the one --whitelist / --fair describe; one answer per job: the task."""
    if args.order == "reversed":
        if not all(i.text for p in prompts for i in p.instructions):
            raise UsageError("--order reversed needs each instruction's text, which only the built-in prompts have")
        prompts = [P.reorder(p) for p in prompts]
    remedy = Remedy(remedy_label(args), args.whitelist or [], args.fair, args.debias)
    return Design(prompts, [remedy], [("task", None)])


def score(args, job, turn: str, response: str) -> dict:
    """The IFEval checks of the prompt's instructions, strict and loose."""
    verdict = ifeval.evaluate(response, job.prompt.instruction_ids, job.prompt.kwargs)
    return dict(instruction_ids=job.prompt.instruction_ids, kwargs=job.prompt.kwargs, directive=job.prompt.directive,
                task=job.prompt.task, strict=verdict["strict"], loose=verdict["loose"],
                prompt_strict=verdict["prompt_strict"], prompt_loose=verdict["prompt_loose"])


# ----------------------------------------------------------------------------- summary

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


def family_accuracy(records: list[dict]) -> dict:
    """Instruction-level strict accuracy per IFEval family."""
    verdicts = defaultdict(list)
    for r in records:
        for instruction_id, ok in zip(r["instruction_ids"], r["strict"]):
            verdicts[ifeval.family(instruction_id)].append(ok)
    return {f: mean(verdicts[f]) for f in ifeval.FAMILIES if verdicts[f]}


def summarize_accuracy(records: list[dict]) -> dict:
    """Per (policy|remedy) and ratio: accuracy, families, single vs multi, normalised, rank correlation, keep rates."""
    out = {}
    for setting, by_ratio in group_by_setting(records).items():
        rows = {}
        for ratio, recs in by_ratio.items():
            recs = sorted(recs, key=lambda r: r["key"])
            single = [r for r in recs if len(r["instruction_ids"]) == 1]
            multi = [r for r in recs if len(r["instruction_ids"]) > 1]
            rows[ratio] = {**accuracy(recs), "single": accuracy(single), "multi": accuracy(multi),
                           "families": {"all": family_accuracy(recs), "single": family_accuracy(single),
                                        "multi": family_accuracy(multi)},
                           "keep": {name: mean([r["keep"].get(name) for r in recs]) for name in ("directive", "defense")}}
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
        out[setting] = {str(ratio): row for ratio, row in rows.items()}
    return out


def print_table(summary: dict, file=sys.stdout):
    print(f"\n{'policy|remedy':28} {'ratio':>5} {'n':>4} {'P-str':>6} {'P-lse':>6} {'I-str':>6} {'I-lse':>6} "
          f"{'single':>6} {'multi':>6} {'rho-s':>6} {'rho-m':>6} {'k-dir':>6} {'k-def':>6}", file=file)
    for setting, rows in summary.items():
        for ratio, row in rows.items():
            rho = row.get("spearman", {})
            print(f"{setting:28} {float(ratio):5.2f} {row['n_prompts']:4d} {fmt(row['prompt_strict'])} "
                  f"{fmt(row['prompt_loose'])} {fmt(row['instruction_strict'])} {fmt(row['instruction_loose'])} "
                  f"{fmt(row['single']['instruction_strict'])} {fmt(row['multi']['instruction_strict'])} "
                  f"{fmt(rho.get('single'))} {fmt(rho.get('multi'))} {fmt(row['keep']['directive'])} "
                  f"{fmt(row['keep']['defense'])}", file=file)
    print("P/I = prompt/instruction level, str/lse = strict/loose; single/multi = instruction-level strict; "
          "rho = Spearman of family accuracies vs r=0; k-dir/k-def = keep rate of directive/defense", file=file)


# ----------------------------------------------------------------------------- figures

def plot_accuracy_figures(summary: dict, out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(summary)
    ratios = lambda s: [float(r) for r in summary[s]]
    written = []

    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.4 * len(settings)), squeeze=False, sharey=True)
    for row_axes, s in zip(axes, settings):
        for ax, kind in zip(row_axes, ("single", "multi")):
            for f in ifeval.FAMILIES:
                ys = [summary[s][r]["families"][kind].get(f) for r in summary[s]]
                if any(y is not None for y in ys):
                    ax.plot(ratios(s), [float("nan") if y is None else y for y in ys], marker="o", label=f)
            ax.set_title(f"{s}: {kind}-instruction prompts")
            ax.set_xlabel("compression ratio r")
            ax.set_ylabel("instruction accuracy (strict)")
    axes[0][1].legend(fontsize=7, loc="upper right")
    written.append(save_figure(fig, out, "fig2_family_accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in settings:
        for kind, style in (("single", "-"), ("multi", "--")):
            ys = [summary[s][r].get("spearman", {}).get(kind) for r in summary[s]]
            ax.plot(ratios(s), [float("nan") if y is None else y for y in ys], style, marker="o", label=f"{s} ({kind})")
    ax.set(title="Rank correlation of family accuracies vs r = 0", xlabel="compression ratio r", ylabel="Spearman rho")
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out, "fig3_rank_correlation.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in settings:
        line, = ax.plot(ratios(s), [summary[s][r]["instruction_strict"] for r in summary[s]], marker="o", label=f"{s} strict")
        ax.plot(ratios(s), [summary[s][r]["instruction_loose"] for r in summary[s]], "--", color=line.get_color(),
                label=f"{s} loose")
    ax.set(title="Instruction-level accuracy", xlabel="compression ratio r", ylabel="accuracy")
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out, "fig4_average_accuracy.png"))

    written.append(plot_keep_rates(summary, out))
    return written


# ----------------------------------------------------------------------------- main

EVALUATE = Experiment(
    name="evaluate", description=__doc__, records_name="responses.jsonl", defaults=DEFAULTS, presets=PRESETS,
    add_arguments=add_arguments, design=design, score=score,
    summarize=lambda records: {"results": summarize_accuracy(records)},
    print_summary=lambda summary, file: print_table(summary["results"], file),
    figures=lambda summary, records, out, example: plot_accuracy_figures(summary["results"], out))


def main(argv=None):
    run(EVALUATE, argv)


if __name__ == "__main__":
    main_guard(main)
