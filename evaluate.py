"""Instruction following and retrieval under KV-cache compression (the paper's Pitfalls 1, 2, 4 and 5).

For each policy, ratio and prompt: compress the system turn (which holds the
instructions), answer the user's task from the compressed cache, and check the answer
with the IFEval checks. Reproduces, on whatever model you point it at:

  Fig. 2  per-family accuracy vs ratio, single- vs multi-instruction prompts
  Fig. 3  Spearman rank correlation of the families' accuracies at r vs at r = 0
  Fig. 4  average accuracy vs ratio per policy
  Fig. 8  keep rate of the directive vs the defense (eviction bias)

With --data ruler:TASK[,TASK...] (and --length N tokens) the prompts are RULER's synthetic
tasks instead (ruler.py): the context is the system turn, the question the user turn, the
score RULER's string match; the figures show accuracy vs ratio per task and the keep rate
of the facts vs the haystack. One run holds one kind of prompt (`make demo` runs both).

The defaults (--preset demo) take about 2 minutes on a 2-core CPU: the bundled 135M model,
12 built-in prompts, StreamingLLM and TOVA at 3 ratios, 64 new tokens. --preset retrieval
is its retrieval counterpart (single-needle RULER prompts, SnapKV with and without the
question). --preset full runs all five policies on all 155 built-in prompts at 4 ratios
(about an hour there). The paper's full run:

  python evaluate.py --model weights/llama-3.1-8b-instruct --data paper --defense none \\
      --policy streaming_llm,h2o,knorm,snapkv,tova --ratios 0:0.9:0.1 --limit 0 \\
      --max-new-tokens 1280 --device cuda --dtype bfloat16 --batch-size 16

Outputs in --out: responses.jsonl (one record per setting, ratio and prompt, appended as it
goes: rerun the same command to resume), summary.json, and fig*.png.
"""
from __future__ import annotations

from dataclasses import dataclass

import flags
import ifeval
import prompts as P
import ruler
from experiment import Experiment, boundaries, load_text, main_guard, run, whitelist_char_spans
from flags import Design, UsageError
from report import evaluate_figures, evaluate_summary, print_evaluate, print_ruler, ruler_figures, ruler_summary
from setting import Remedy

DEFAULTS = dict(policy="streaming_llm,tova", ratios="0,0.5,0.75", defense="defense-first", limit=12,
                max_new_tokens=64, dtype="float32", batch_size=8, out="runs/evaluate")
PRESETS = {"demo": {},
           "retrieval": dict(data="ruler:niah_single_1", length=512, policy="snapkv", ratios="0,0.5",
                             query_aware="both", defense="none", limit=6, max_new_tokens=32, out="runs/retrieval"),
           "full": dict(policy="streaming_llm,h2o,knorm,snapkv,tova", ratios="0,0.25,0.5,0.75", limit=0,
                        max_new_tokens=96)}

RULER_PREFIX = "ruler:"
RULER_ALIASES = {"niah_single": ["niah_single_1"], "niah_multikey": ["niah_multikey_1"], "all": list(ruler.TASKS)}
RULER_LENGTH = 1024                     # --length's default, in tokens of the whole prompt
RULER_LONGEST = 131072                  # RULER's longest setting (128K): a bound on the work --length can ask for
RULER_NAMES = {"fact": "facts", "distractor": "distractors", "haystack": "haystack", "instruction": "instruction",
               "example": "example"}    # ruler.Example's span kinds -> the keep rates' names


def add_arguments(parser):
    parser.add_argument("--order", choices=["given", "reversed"], default="given",
                        help="instruction order inside the directive (built-in prompts; Pitfall 4)")
    parser.add_argument("--length", type=int, metavar="N",
                        help=f"with --data ruler:TASKS: each prompt's length in tokens of the model's chat "
                             f"(system + user turn; default {RULER_LENGTH})")
    parser.add_argument("--answer-prefix", action="store_true",
                        help="with --data ruler:TASKS: start each answer with RULER's answer prefix (\"The special "
                             "magic number for ... is\"), sent after the chat's generation prompt as kvpress's "
                             "pipeline sends it; its tokens come on top of --length. Default: not sent")


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
    if args.debias != 1 and args.fair == "none":
        raise UsageError(f"--debias {args.debias:g} blends fair eviction with the plain policy: give --fair too")
    if isinstance(prompts[0], RulerPrompt):
        return ruler_design(args, prompts)
    if args.fair == "facts":
        raise UsageError("--fair facts needs RULER prompts (--data ruler:TASKS): use --fair defense or instructions")
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


# ----------------------------------------------------------------------------- RULER's prompts in the same loop

@dataclass
class RulerPrompt(P.Prompt):
    """A RULER example as a prompt: its context is the system turn (`directive`), its question the user turn
    (`task`); no instructions. The example (answers, character spans of the facts) travels with it."""
    example: ruler.Example | None = None


def ruler_tasks(data: str) -> list[str]:
    """'ruler:niah_single_1,vt' -> the task names, in RULER's order, aliases resolved. Raises UsageError."""
    names = [name.strip() for name in data[len(RULER_PREFIX):].split(",") if name.strip()]
    if not names:
        raise UsageError(f"--data {data!r} names no task: give ruler:TASK[,TASK...] or ruler:all "
                         f"(tasks: {', '.join(ruler.TASKS)})")
    tasks = []
    for name in names:
        if name not in ruler.TASKS and name not in RULER_ALIASES:
            raise UsageError(f"--data: unknown RULER task {name!r}: choose from {', '.join(ruler.TASKS)}, or "
                             f"{', '.join(RULER_ALIASES)}")
        tasks += RULER_ALIASES.get(name, [name])
    return [task for task in ruler.TASKS if task in tasks]


def ruler_length(args) -> int:
    return RULER_LENGTH if args.length is None else args.length


def load_prompts(args, paper_data: str) -> list[P.Prompt]:
    """--data: RULER's tasks, generated with the model's tokenizer (--limit prompts per task, --seed, --length),
    or what flags.load_prompts reads. Raises UsageError."""
    if not (args.data or "").startswith(RULER_PREFIX):
        if args.length is not None:
            raise UsageError(f"--length {args.length} applies to RULER prompts (--data ruler:TASKS) only")
        if args.answer_prefix:
            raise UsageError("--answer-prefix applies to RULER prompts (--data ruler:TASKS) only")
        return flags.load_prompts(args, paper_data)
    tasks, length = ruler_tasks(args.data), ruler_length(args)
    if not 1 <= length <= RULER_LONGEST:
        raise UsageError(f"--length {length}: give a number of tokens from 1 to {RULER_LONGEST}")
    if args.limit < 1:
        raise UsageError(f"--limit {args.limit}: RULER prompts are generated, so there is no 'all': give the number "
                         "of prompts per task (at least 1)")
    tok, model_args = load_text(args.model)                     # RULER's lengths are in the model's tokens
    if length + args.max_new_tokens > model_args.max_positions:   # refused before any prompt is made
        raise UsageError(f"--length {length} and --max-new-tokens {args.max_new_tokens} need "
                         f"{length + args.max_new_tokens} positions, more than the model's context of "
                         f"{model_args.max_positions}: lower --length")
    try:
        examples = [ruler.make_example(tok, task, length, args.seed, index)
                    for task in tasks for index in range(args.limit)]
    except ValueError as e:
        raise UsageError(f"--data {args.data!r} --length {length}: {e}") from None
    return [RulerPrompt(e.key, [], e.system, e.user, example=e) for e in examples]


def ruler_design(args, prompts: list[RulerPrompt]) -> Design:
    """The remedies on RULER prompts: --whitelist facts, --fair facts, --protect N; every other flag as for the
    instruction prompts. The defense and the instruction order belong to the instruction prompts."""
    if args.fair in ("defense", "instructions"):
        raise UsageError(f"--fair {args.fair} needs the instruction prompts; RULER prompts take --fair facts")
    if "defense" in (args.whitelist or []):
        raise UsageError("--whitelist defense: RULER prompts have no defense; --whitelist facts keeps their facts")
    if args.order != "given":
        raise UsageError("--order reversed needs the instruction prompts; RULER prompts have no instructions")
    if args.defense not in ("none", DEFAULTS["defense"]):
        raise UsageError(f"--defense {args.defense}: RULER prompts take no defense (their context is the system turn)")
    remedy = Remedy(remedy_name(args), args.whitelist or [], args.fair, args.debias, args.protect or 0)
    spec = {"tasks": ruler_tasks(args.data), "length": ruler_length(args), "seed": args.seed}
    if args.answer_prefix:                                        # (absent when off: older folders still resume)
        spec["answer_prefix"] = True
    return Design(prompts, [remedy], [("task", None)], ruler_score, {"ruler": spec},
                  system_message=lambda prompt, defense: P.SystemMessage(prompt.example.system, {}, []),
                  layout=ruler_layout,
                  answer_prefix=(lambda prompt: prompt.example.answer_prefix) if args.answer_prefix else None)


def ruler_score(job, turn: str, response: str) -> dict:
    """RULER's string match: the share of the expected strings found in the answer (ruler.score)."""
    example = job.prompt.example
    return dict(task=example.task, answers=example.answers, depths=example.depths, n_tokens=example.n_tokens,
                score=ruler.score(example, response))


def ruler_pieces(system, example: ruler.Example) -> list[tuple[str, tuple[int, int]]]:
    """The example's character spans as token spans of its system turn (`system` its encoding), in text order, each
    with its kind ("fact", "haystack", ...): contiguous, from the context's first token to its last. A token that
    straddles two spans goes to the later one (experiment.token_spans' rule); a span left with no token of its
    own (a separator space merged into the next word's token) is dropped."""
    runs = sorted((start, end, kind) for kind, spans in example.spans.items() for start, end in spans)
    starts = [system.token_span(0, start, end)[0] for start, end, _ in runs]
    ends = starts[1:] + [system.token_span(0, *runs[-1][:2])[1]]
    return [(kind, (start, end)) for (_, _, kind), start, end in zip(runs, starts, ends) if end > start]


def ruler_layout(job, system) -> tuple[dict, list[int], list[tuple[int, int]] | None]:
    """A RULER prompt's layout (experiment.prompt_layout's counterpart): the token spans of its facts, haystack,
    distractors, instruction and one-shot example; whitelisted positions ('facts': every fact's tokens; another
    phrase where it occurs; --protect N: the first and last N tokens of every piece and of the template's head
    and tail); with --fair facts, every piece its own partition, so that each fact and each stretch of haystack
    between facts keeps the same share."""
    pieces = ruler_pieces(system, job.prompt.example)
    spans = {}
    for kind, span in pieces:
        spans.setdefault(RULER_NAMES[kind], []).append(span)
    remedy = job.setting.remedy
    positions = []
    for phrase in remedy.whitelist:
        if phrase == "facts":
            positions += [p for start, end in spans.get("facts", []) for p in range(start, end)]
        else:
            for start, end in whitelist_char_spans(job.system, phrase, job.prompt.key):
                positions += range(*system.token_span(0, start, end))
    if remedy.protect:
        parts = [(0, pieces[0][1][0]), *(span for _, span in pieces), (pieces[-1][1][1], len(system.ids))]
        positions += boundaries([span for span in parts if span[1] > span[0]], remedy.protect)
    partitions = [span for _, span in pieces] if remedy.fair == "facts" else None
    return spans, positions, partitions


def is_ruler(records: list[dict]) -> bool:
    return bool(records) and "answers" in records[0]


# ----------------------------------------------------------------------------- main

EVALUATE = Experiment(
    name="evaluate", description=__doc__, records_name="responses.jsonl",
    paper_data="sys_ifeval.jsonl", defaults=DEFAULTS, presets=PRESETS,
    add_arguments=add_arguments, design=design,
    summarize=lambda records, settings: ruler_summary(records) if is_ruler(records) else evaluate_summary(records),
    print_summary=lambda summary, file: (print_ruler if "tasks" in summary else print_evaluate)(summary, file),
    figures=lambda summary, records, out, example: (ruler_figures if "tasks" in summary else evaluate_figures)(
        summary, records, out, example),
    load_prompts=load_prompts)


def main(argv=None):
    run(EVALUATE, argv)


if __name__ == "__main__":
    main_guard(main)
