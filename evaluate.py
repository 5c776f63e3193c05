"""Instruction following under KV-cache compression (the paper's Pitfalls 1, 2, 4 and 5).

For each policy, ratio and prompt: compress the system turn (which holds the
instructions), answer the user's task from the compressed cache, and check the answer
with the IFEval checks. Reproduces, on whatever model you point it at:

  Fig. 2  per-family accuracy vs ratio, single- vs multi-instruction prompts
  Fig. 3  Spearman rank correlation of the families' accuracies at r vs at r = 0
  Fig. 4  average accuracy vs ratio per policy
  Fig. 8  keep rate of the directive vs the defense (eviction bias)

The defaults (--preset demo) take about 2 minutes on a 2-core CPU: the bundled 135M model,
12 built-in prompts, StreamingLLM and TOVA at 3 ratios, 64 new tokens. --preset full runs
all five policies on all 155 built-in prompts at 4 ratios (about an hour there). The
paper's full run:

  python evaluate.py --model weights/Llama-3.1-8B-Instruct --data paper --defense none \\
      --policy streaming_llm,h2o,knorm,snapkv,tova --ratios 0:0.9:0.1 --limit 0 \\
      --max-new-tokens 1280 --device cuda --dtype bfloat16 --batch-size 16

Outputs in --out: responses.jsonl (one record per policy, ratio and prompt, appended as it
goes: rerun the same command to resume), summary.json, and fig*.png.
"""
from __future__ import annotations

import ifeval
import prompts as P
from experiment import Experiment, main_guard, run
from flags import Design, UsageError
from report import evaluate_figures, evaluate_summary, print_evaluate
from setting import Remedy

DEFAULTS = dict(policy="streaming_llm,tova", ratios="0,0.5,0.75", defense="defense-first", limit=12,
                max_new_tokens=64, dtype="float32", batch_size=8, out="runs/evaluate")
PRESETS = {"demo": {},
           "full": dict(policy="streaming_llm,h2o,knorm,snapkv,tova", ratios="0,0.25,0.5,0.75", limit=0,
                        max_new_tokens=96)}


def add_arguments(parser):
    parser.add_argument("--order", choices=["given", "reversed"], default="given",
                        help="instruction order inside the directive (built-in prompts; Pitfall 4)")


def remedy_name(args) -> str:
    parts = []
    if args.whitelist:
        parts.append("whitelist")
    if args.fair != "none":
        parts.append(f"fair-{args.fair}" + (f"-debias{args.debias:g}" if args.debias < 1 else ""))
    if args.protect:
        parts.append(f"protect{args.protect}")
    return "+".join(parts) or "none"


def design(args, prompts: list[P.Prompt]) -> Design:
    """One remedy for every policy, the one --whitelist / --fair / --protect describe; one answer per job: the task."""
    if args.order == "reversed":
        if not all(i.text for p in prompts for i in p.instructions):
            raise UsageError("--order reversed needs each instruction's text, which only the built-in prompts have")
        prompts = [P.reorder(p) for p in prompts]
    remedy = Remedy(remedy_name(args), args.whitelist or [], args.fair, args.debias, args.protect or 0)
    return Design(prompts, [remedy], [("task", None)], score)


def score(job, turn: str, response: str) -> dict:
    """The IFEval checks of the prompt's instructions, strict and loose."""
    verdict = ifeval.evaluate(response, job.prompt.instruction_ids, job.prompt.kwargs)
    return dict(instruction_ids=job.prompt.instruction_ids, kwargs=job.prompt.kwargs, directive=job.prompt.directive,
                task=job.prompt.task, strict=verdict["strict"], loose=verdict["loose"],
                prompt_strict=verdict["prompt_strict"], prompt_loose=verdict["prompt_loose"])


# ----------------------------------------------------------------------------- main

EVALUATE = Experiment(
    name="evaluate", description=__doc__, records_name="responses.jsonl",
    paper_data="sys_ifeval.jsonl", defaults=DEFAULTS, presets=PRESETS,
    add_arguments=add_arguments, design=design,
    summarize=lambda records, settings: evaluate_summary(records),
    print_summary=print_evaluate,
    figures=evaluate_figures)


def main(argv=None):
    run(EVALUATE, argv)


if __name__ == "__main__":
    main_guard(main)
