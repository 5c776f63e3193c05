"""The numbers the README needs from a first GPU, on the default model (run by bench/gpu_check.sh).

    python bench/gpu_check.py --device cuda [--json numbers.json]

  correctness  the default model's float32 logits on --device against the CPU's (max |diff|), and
               its bfloat16 answer to "What is the capital of France?" (must say Paris)
  decode       prefill and decode tokens/s in bfloat16 at batch 1 and 16 (92-token prompt, 64 new
               tokens, no stop): decode = (N - 1) rows x tokens / (time of N tokens - time of 1)
  batch        prompts/min of the default evaluate.py workload (tova, r = 0.5, 16 built-in prompts,
               96 new tokens) in bfloat16 at batch 1 and 16, through experiment.run_batch

Exits non-zero when a check fails. Timings: medians of --repeats, the device synchronised.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]          # bench/bench.py first (the folder bench/ is not a package), then the project

import bench  # noqa: E402  (its prompt, so the numbers compare with docs/performance.md's CPU table)
import evaluate  # noqa: E402
from experiment import build_jobs, load_model_and_tokenizer, make_batches, run_batch  # noqa: E402
from flags import parse_args, plan_run  # noqa: E402
from model import generate, load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def synchronized(device: str, call):
    """Seconds that `call` takes, the device's queue drained before and after."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - start


def check_correctness(folder: str, device: str) -> dict:
    tok = load_tokenizer(folder)
    ids = torch.tensor([tok.chat_ids(bench.CHAT_SYSTEM, bench.CHAT_USER)[1].ids])          # (1, T)
    cpu = load_model(folder, dtype="float32")
    expected = bench.forward(cpu, cpu.new_cache(), ids).float()                             # (1, V)
    del cpu
    on_device = load_model(folder, device=device, dtype="float32")
    got = bench.forward(on_device, on_device.new_cache(), ids.to(device)).float().cpu()
    diff = float((got - expected).abs().max())
    del on_device
    model = load_model(folder, device=device, dtype="bfloat16")
    _, full = tok.chat_ids("You are a helpful assistant.", "What is the capital of France?")
    answer = tok.decode(generate(model, model.new_cache(), torch.tensor([full.ids], device=device), 16)[0],
                        skip_special=True)
    return {"float32_logits_max_abs_diff_vs_cpu": diff, "bfloat16_france_answer": answer,
            "ok": diff < 1e-3 and "Paris" in answer}


def check_decode(folder: str, device: str, batches: list[int], new_tokens: int, repeats: int) -> dict:
    tok = load_tokenizer(folder)
    prompt = tok.chat_ids(bench.CHAT_SYSTEM, bench.CHAT_USER)[1].ids
    model = load_model(folder, device=device, dtype="bfloat16")
    out = {}
    for batch in batches:
        ids = torch.tensor([prompt] * batch, device=device)                                 # (B, T)
        run = lambda n: generate(model, model.new_cache(batch, capacity=len(prompt) + n + 8), ids, n, stop_ids=[])
        run(2)                                                                              # warm up
        pre, one, full = [], [], []
        for _ in range(repeats):
            pre.append(synchronized(device, lambda: bench.forward(model, model.new_cache(batch, capacity=len(prompt) + 8),
                                                                  ids)))
            one.append(synchronized(device, lambda: run(1)))
            full.append(synchronized(device, lambda: run(new_tokens)))
        pre_s, one_s, full_s = (statistics.median(t) for t in (pre, one, full))
        out[f"batch{batch}"] = {"prefill_tok_s": batch * len(prompt) / pre_s,
                                "decode_tok_s": batch * (new_tokens - 1) / (full_s - one_s),
                                "prompt_tokens": len(prompt), "new_tokens": new_tokens}
    return out


def check_batch(folder: str, device: str, batches: list[int], prompts: int, answer_tokens: int) -> dict:
    flags = parse_args(evaluate.EVALUATE, ["--policy", "tova", "--ratios", "0.5", "--limit", str(prompts),
                                           "--max-new-tokens", str(answer_tokens), "--dtype", "bfloat16", "--device", device,
                                           "--model", folder])
    plan = plan_run(evaluate.EVALUATE, flags)
    model, tok = load_model_and_tokenizer(plan)
    jobs = build_jobs(plan, tok, model.args.max_positions)
    run_batch(model, jobs[:2], 4)                                                           # warm up
    out = {}
    for batch in batches:
        seconds = synchronized(device, lambda: [run_batch(model, b, flags.max_new_tokens)
                                                for b in make_batches(jobs, batch)])
        out[f"batch{batch}"] = {"prompts_per_minute": len(jobs) / seconds * 60, "jobs": len(jobs),
                                "answer_tokens": answer_tokens}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--folder", default=bench.DEFAULT_FOLDER)
    parser.add_argument("--batch-sizes", type=bench.int_list, default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16, help="batch: built-in prompts (default %(default)s)")
    parser.add_argument("--answer-tokens", type=int, default=96, help="batch: --max-new-tokens (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device}: torch {torch.__version__} sees no CUDA device "
                 "(a CPU-only wheel? install torch's CUDA build)")
    numbers = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__}
    numbers["correctness"] = check_correctness(args.folder, args.device)
    numbers["decode_bfloat16"] = check_decode(args.folder, args.device, args.batch_sizes, args.new_tokens, args.repeats)
    numbers["batch_bfloat16"] = check_batch(args.folder, args.device, args.batch_sizes, args.prompts, args.answer_tokens)
    print(json.dumps(numbers, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)
    if not numbers["correctness"]["ok"]:
        sys.exit("error: the model on this device disagrees with the CPU (see correctness above)")


if __name__ == "__main__":
    main()
