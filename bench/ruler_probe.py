"""A first RULER measurement through the Python API (issue 23): what the default model retrieves.

    OMP_NUM_THREADS=1 python bench/ruler_probe.py [--length 1024] [--n 20] [--tasks all] \
        [--compress-task niah_single_1 --compress-n 12 --policies snapkv,knorm,streaming_llm --ratio 0.5]

1. every task of ruler.TASKS uncompressed, n prompts each (seed 0, indices 0..n-1);
2. one task compressed at --ratio by each policy, the paper's protocol (the system turn compressed
   once after its prefill, before the question is known), on the first --compress-n of those prompts;
   r = 0 is the uncompressed run of step 1 (ratio 0 evicts nothing).
Greedy, right-padded batches as experiment.run_batch does them; each task's answer budget is
MAX_NEW_TOKENS (below RULER's where the answer is short). Scores: RULER's string_match_all,
mean and SEM over prompts. --out writes one JSON line per prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ruler  # noqa: E402
from model import generate, load_model  # noqa: E402
from policies import Compression, prefill  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

# tokens to generate: the answer with a sentence around it (RULER: niah 128, vt 30, cwe 120, fwe 50)
# (64 cut answers of multikey_3, multivalue and multiquery short: they take RULER's 128)
MAX_NEW_TOKENS = {"niah_single_1": 32, "niah_single_2": 32, "niah_single_3": 64, "niah_multikey_1": 32,
                  "niah_multikey_2": 32, "niah_multikey_3": 128, "niah_multivalue": 128, "niah_multiquery": 128,
                  "vt": 30, "cwe": 120, "fwe": 50}


def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (B, T) tokens and the (B, T) mask of real ones."""
    width = max(map(len, rows))
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], real[i, :len(row)] = torch.tensor(row), True
    return tokens, real


@torch.no_grad()
def answer(model, tok, examples: list[ruler.Example], spec: Compression, max_new_tokens: int) -> list[str]:
    """Prefill and compress the system turns together, then answer each question from that cache."""
    chats = [tok.chat_ids(e.system, e.user) for e in examples]
    system, system_real = pad([head.ids for head, _ in chats])
    user, user_real = pad([whole.ids[len(head.ids):] for head, whole in chats])
    cache = model.new_cache(len(examples), capacity=system.shape[1] + user.shape[1] + max_new_tokens)
    prefill(model, cache, system, spec, real=system_real)
    return [tok.decode(ids, skip_special=True) for ids in
            generate(model, cache, user, max_new_tokens, real=user_real)]


def run(model, tok, examples, spec, max_new_tokens, batch, label, out):
    scores, start = [], time.time()
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        for example, response in zip(chunk, answer(model, tok, chunk, spec, max_new_tokens)):
            scores.append(ruler.score(example, response))
            if out:
                out.write(json.dumps(dict(setting=label, key=example.key, n_tokens=example.n_tokens,
                                          answers=example.answers, response=response, score=scores[-1])) + "\n")
    mean = statistics.fmean(scores)
    sem = statistics.stdev(scores) / len(scores) ** 0.5 if len(scores) > 1 else float("nan")
    print(f"{label:45s} n={len(scores):3d}  acc={mean:.3f} ± {sem:.3f}  ({time.time() - start:6.1f} s)", flush=True)
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=os.path.join(ROOT, "weights", "smollm2-135m-instruct"))
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--tasks", default="all", help="comma-separated ruler.TASKS names, or 'all'")
    parser.add_argument("--n-per-task", default="", help="overrides, e.g. cwe=8,fwe=8")
    parser.add_argument("--compress-task", default="niah_single_1")
    parser.add_argument("--compress-n", type=int, default=12)
    parser.add_argument("--policies", default="snapkv,knorm,streaming_llm", help="'' skips step 2")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", help="a .jsonl file for one line per prompt")
    args = parser.parse_args()
    tasks = list(ruler.TASKS) if args.tasks == "all" else args.tasks.split(",")
    if unknown := [t for t in tasks + [args.compress_task] if t not in ruler.TASKS]:
        sys.exit(f"error: unknown task(s) {', '.join(unknown)} (choose from {', '.join(ruler.TASKS)})")
    try:
        n_for = {t: args.n for t in tasks} | {k: int(v) for k, v in (p.split("=") for p in args.n_per_task.split(",") if p)}
    except ValueError:
        sys.exit(f"error: --n-per-task {args.n_per_task!r} is not like cwe=8,fwe=8")
    model, tok = load_model(args.weights, dtype="float32"), load_tokenizer(args.weights)
    out = open(args.out, "w") if args.out else None
    print(f"length {args.length}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}", flush=True)
    begin = time.time()
    for task in tasks:
        examples = ruler.make_examples(tok, task, args.length, n_for[task])
        run(model, tok, examples, Compression("full"), MAX_NEW_TOKENS[task], args.batch,
            f"{task} full ({MAX_NEW_TOKENS[task]} new tokens)", out)
    examples = ruler.make_examples(tok, args.compress_task, args.length, args.compress_n)
    for policy in filter(None, args.policies.split(",")):
        run(model, tok, examples, Compression(policy, ratio=args.ratio), MAX_NEW_TOKENS[args.compress_task],
            args.batch, f"{args.compress_task} {policy} r={args.ratio}", out)
    print(f"total {time.time() - begin:.0f} s, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
