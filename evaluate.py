"""Instruction following under KV-cache compression (the paper's Pitfalls 1, 2, 4 and 5).

For each policy, ratio and prompt: compress the system turn (which holds the
instructions), answer the user's task from the compressed cache, and check the answer
with the IFEval checks. Reproduces, on whatever model you point it at:

  Fig. 2  per-family accuracy vs ratio, single- vs multi-instruction prompts
  Fig. 3  Spearman rank correlation of the families' accuracies at r vs at r = 0
  Fig. 4  average accuracy vs ratio per policy
  Fig. 8  keep rate of the directive vs the defense (eviction bias)

Defaults are sized for a 2-core CPU in a few minutes (the bundled 135M model, 32 built-in
prompts, 4 ratios, 96 new tokens). The paper's full run:

  python evaluate.py --model weights/Llama-3.1-8B-Instruct --data sys_ifeval.jsonl --defense none \\
      --policy streaming_llm,h2o,knorm,snapkv,tova --ratios 0:0.9:0.1 --limit 0 \\
      --max-new-tokens 1280 --device cuda --dtype bfloat16 --batch-size 16

Outputs in --out: responses.jsonl (one record per policy, ratio and prompt, appended as it
goes: rerun the same command to resume), summary.json, and fig*.png.
"""
from __future__ import annotations

import argparse
import functools
import os

import ifeval
import prompts as P
from experiment import (Job, RunFolder, UsageError, common_arguments, fingerprint,
                        load_model_and_tokenizer,
                        main_guard, model_fingerprint, prepare_job, read_records, run_jobs, setup, write_json)
from report import evaluate_figures, evaluate_summary, print_evaluate

DEFAULTS = dict(policy="streaming_llm,tova", ratios="0,0.25,0.5,0.75", defense="defense-first", limit=32,
                max_new_tokens=96, dtype="float32", batch_size=8, out="runs/evaluate")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser, DEFAULTS)
    parser.add_argument("--order", choices=["given", "reversed"], default="given",
                        help="instruction order inside the directive (built-in prompts; Pitfall 4)")
    return parser.parse_args(argv)


def remedy_label(args) -> str:
    parts = []
    if args.whitelist:
        parts.append("whitelist")
    if args.fair != "none":
        parts.append(f"fair-{args.fair}" + (f"-debias{args.debias:g}" if args.debias < 1 else ""))
    return "+".join(parts) or "none"


def build_jobs(args, model, tok, policies, ratios, defense, prompts):
    if args.order == "reversed":
        prompts = [P.reorder(p) for p in prompts]
    encode = functools.lru_cache(maxsize=None)(tok.chat_ids)
    remedy = remedy_label(args)
    jobs = []
    for policy in policies:
        for ratio in ratios:
            for prompt in prompts:
                job = Job(policy, ratio, remedy, prompt, P.build_system_message(prompt, defense), [("task", prompt.task)])
                prepare_job(job, encode, model, args.whitelist or [], args.fair, args.debias, args.max_new_tokens,
                            args.seed)
                jobs.append(job)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    settings.update(prompts=P.prompts_fingerprint(prompts), model_files=model_fingerprint(args.model))
    return jobs, settings


def to_records(job: Job, result: dict, tok) -> list[dict]:
    answer = result["answers"][0]
    response = tok.decode(answer, skip_special=True)
    verdict = ifeval.evaluate(response, job.prompt.instruction_ids, job.prompt.kwargs)
    return [dict(job=job.key, policy=job.policy, ratio=job.ratio, remedy=job.remedy, key=job.prompt.key,
                 instruction_ids=job.prompt.instruction_ids, kwargs=job.prompt.kwargs, directive=job.prompt.directive,
                 task=job.prompt.task, response=response, strict=verdict["strict"], loose=verdict["loose"],
                 prompt_strict=verdict["prompt_strict"], prompt_loose=verdict["prompt_loose"],
                 system_tokens=result["report"]["system_len"], n_kept=result["report"]["n_kept"],
                 new_tokens=len(answer), keep=result["keep"], whitelist_kept=result["report"].get("whitelist_kept"))]


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    plan = setup(args)                                   # validate flags before loading anything heavy
    model, tok = load_model_and_tokenizer(args)
    jobs, settings = build_jobs(args, model, tok, *plan)
    folder = RunFolder(args.out, settings, "responses.jsonl")
    folder.check()
    run_jobs(jobs, model, tok, folder, args.batch_size, args.max_new_tokens, to_records, "evaluate")
    records = read_records(folder.records_path)
    summary = {"settings": settings, "run": fingerprint(settings), **evaluate_summary(records)}
    write_json(os.path.join(args.out, "summary.json"), summary)
    print_evaluate(summary)
    figures = evaluate_figures(summary, records, args.out)
    print(f"\nwrote {folder.records_path}, {os.path.join(args.out, 'summary.json')}, "
          f"{', '.join(os.path.basename(f) for f in figures)}")


if __name__ == "__main__":
    main_guard(main)
