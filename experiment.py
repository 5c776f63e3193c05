"""The loop shared by evaluate.py and leak.py: build prompts -> compress -> generate -> score -> write.

A run is a list of *jobs*: one system prompt under one (policy, ratio, remedy). A job's
system turn is prefilled and compressed once; then each of its user turns (the task, or
the attacks) is answered from that compressed cache, returning to it in between.
Jobs run in batches of --batch-size rows (ragged rows are padded; each row keeps its own
budget and positions).

Results survive a crash: every finished job appends its records to a JSONL file in the
output folder, and a rerun with the same settings skips what is there. Settings live in
run.json; a folder holding a run with other settings is refused, never mixed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

import prompts as P
from model import DTYPES, generate, load_model
from policies import POLICIES, Compression, covering_spans, reads_received
from tokenizer import load_tokenizer

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "smollm2-135m-instruct")


class UsageError(ValueError):
    """Bad input from the command line: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- command line

def common_arguments(parser: argparse.ArgumentParser, defaults: dict):
    a = parser.add_argument
    a("--policy", default=defaults["policy"],
      help=f"eviction policy, or a comma list to run several (choices: {', '.join(POLICIES)}; default %(default)s)")
    a("--ratios", default=defaults["ratios"],
      help="fractions of the system turn to evict, 0 <= r < 1: a comma list (0,0.5) or start:stop:step "
           "(0:0.9:0.1, stop included); default %(default)s")
    a("--defense", default=defaults["defense"],
      help=f"defense around the directive: {', '.join(P.DEFENSE_CHOICES)} (paper:NAME reads --defense-file; "
           "default %(default)s)")
    a("--defense-file", help="the paper's defense_template.json, for --defense paper:NAME")
    a("--whitelist", action="append", default=None, metavar="PHRASE",
      help="a phrase of the system message whose tokens are never evicted (repeatable); 'defense' = the "
           "defense's own must-keep phrase")
    a("--fair", choices=["none", "defense", "instructions"], default="none",
      help="fair eviction: equal keep rate for defense and directive ('defense'), or for every instruction "
           "and the defense ('instructions', built-in prompts only); default %(default)s")
    a("--debias", type=float, default=1.0,
      help="with --fair: 0 = the plain policy, 1 = fully fair, in between = budgets interpolated (default 1)")
    a("--data", help="a sys_ifeval-style JSONL file (the paper's data); default: the built-in prompt set")
    a("--limit", type=int, default=defaults["limit"], help="use the first N prompts (default %(default)s; 0 = all)")
    a("--max-new-tokens", type=int, default=defaults["max_new_tokens"], help="answer length cap (default %(default)s)")
    a("--model", default=DEFAULT_MODEL, help="a Hugging Face checkpoint folder (default: the bundled SmolLM2-135M)")
    a("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    a("--dtype", default=defaults["dtype"], choices=list(DTYPES), help="weights and cache dtype (default %(default)s)")
    a("--batch-size", type=int, default=defaults["batch_size"], help="prompts per forward (default %(default)s)")
    a("--seed", type=int, default=0, help="seed of the built-in prompt set and the random policy (default 0)")
    a("--out", default=defaults["out"], help="output folder (default %(default)s)")


def parse_ratios(text: str) -> list[float]:
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise UsageError(f"--ratios {text!r}: the step must be positive")
            values = [round(start + i * step, 6) for i in range(int(math.floor((stop - start) / step + 1e-9)) + 1)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"--ratios {text!r} is not a comma list of numbers or start:stop:step") from None
    bad = [r for r in values if not 0 <= r < 1]
    if bad or not values:
        raise UsageError(f"--ratios: {bad[0] if bad else 'nothing'} is outside [0, 1); a ratio is the fraction evicted")
    return sorted(set(values))


def parse_choices(text: str, choices, what: str) -> list[str]:
    """A comma list of names, each one of `choices`; an unknown name is a UsageError listing them."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    for name in names:
        if name not in choices:
            raise UsageError(f"unknown {what} {name!r}: choose from {', '.join(choices)}")
    return names


def parse_policies(text: str) -> list[str]:
    return parse_choices(text, POLICIES, "policy")


def load_prompts(args) -> list[P.Prompt]:
    if args.limit < 0:
        raise UsageError("--limit must be >= 0")
    if args.data:
        if not os.path.isfile(args.data):
            raise UsageError(f"--data {args.data!r} does not exist")
        prompts = P.load_sys_ifeval(args.data)
    else:
        prompts = P.builtin_prompts(seed=args.seed)
    return prompts[:args.limit] if args.limit else prompts


# ----------------------------------------------------------------------------- jobs

@dataclass
class Job:
    """One system prompt under one (policy, ratio, remedy), with the user turns to answer from it."""
    policy: str
    ratio: float
    remedy: str                          # "none", "whitelist", "fair", "both" (or a label from the flags)
    prompt: P.Prompt
    system: P.SystemMessage
    users: list[tuple[str, str]]         # (name, text): "task", or attack names
    system_ids: list[int] = field(default_factory=list)
    user_ids: list[list[int]] = field(default_factory=list)
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # token spans: "directive", "defense"
    spec: Compression | None = None

    @property
    def key(self) -> str:
        return f"{self.policy}|{self.ratio}|{self.remedy}|{self.prompt.key}"


def token_spans(encoding, char_spans) -> list[tuple[int, int]]:
    """Token spans of the system message for char spans; a token straddling a border goes to the earlier piece."""
    starts = sorted({encoding.token_span(0, s, e)[0] for s, e in char_spans})
    ends = starts[1:] + [encoding.token_span(0, *char_spans[-1])[1]]
    return list(zip(starts, ends))


def prepare_job(job: Job, encode, model, whitelist: list[str], fair: str, debias: float, max_new_tokens: int,
                seed: int = 0):
    """Tokenise the job's turns, find its spans and whitelist, and build its Compression. Raises UsageError.

    `encode(system, user)` is the tokenizer's chat_ids (memoised by the caller: jobs share prompts).
    """
    system, full = None, []
    for _, user in job.users:
        system, enc = encode(job.system.text, user)
        full.append(enc.ids[len(system.ids):])
    job.system_ids, job.user_ids = system.ids, full
    longest = len(system.ids) + max(map(len, full)) + max_new_tokens
    if longest > model.args.max_positions:
        raise UsageError(f"prompt {job.prompt.key} needs {longest} positions with --max-new-tokens, more than the "
                         f"model's context of {model.args.max_positions}")
    directive = job.system.spans["system_prompt"]
    job.spans["directive"] = [system.token_span(0, *directive)]
    job.spans["defense"] = [(0, job.spans["directive"][0][0]), (job.spans["directive"][0][1], len(system.ids))]
    positions = []
    for phrase in whitelist:
        phrases = job.system.whitelist if phrase == "defense" else [phrase]
        if not phrases:
            raise UsageError(f"--whitelist defense: the defense {job.system.spans.get('defense')!r} has no must-keep phrase")
        for text in phrases:
            at = job.system.text.find(text)
            if at < 0:
                raise UsageError(f"whitelist phrase {text!r} is not in the system message of prompt {job.prompt.key}")
            positions += range(*system.token_span(0, at, at + len(text)))
    partitions = None
    if fair == "defense":
        partitions = token_spans(system, [span for _, span in job.system.partitions()])
    elif fair == "instructions":
        n = len(job.prompt.instructions)
        if not all(f"instruction:{i}" in job.system.spans for i in range(n)):
            raise UsageError(f"--fair instructions needs instruction texts; prompt {job.prompt.key} has none "
                             "(the paper's data gives one directive text): use --fair defense")
        pieces = [span for name, span in job.system.partitions() if name != "system_prompt"]
        start, end = directive
        bounds = [start] + [job.system.spans[f"instruction:{i}"][0] for i in range(1, n)] + [end]
        pieces += list(zip(bounds, bounds[1:]))
        partitions = token_spans(system, sorted(pieces))
    job.spec = Compression(job.policy, job.ratio, partitions=partitions, whitelist=sorted(set(positions)) or None,
                           debias=debias if partitions else 1.0, options={"seed": seed} if job.policy == "random" else {})


# ----------------------------------------------------------------------------- running

def pad(rows: list[list[int]], device):
    """Right-pad token lists into (B, T) tokens and a (B, T) mask of real tokens."""
    width = max(map(len, rows))
    tokens = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    real = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row, device=device)
        real[i, :len(row)] = True
    return tokens, real


def run_batch(model, jobs: list[Job], max_new_tokens: int) -> list[dict]:
    """Prefill and compress the jobs' system turns together, then answer each user turn from them."""
    device = model.device
    tokens, real = pad([j.system_ids for j in jobs], device)
    cache = model.new_cache(len(jobs), capacity=tokens.shape[1] + 16)
    cache.record_queries = True
    cache.record_received = any(reads_received(j.spec) for j in jobs)  # H2O: sum attention in the prefill
    model(tokens, cache, real=real)                                     # the system turn's prefill
    reports = cache.compress([j.spec for j in jobs])                    # once, in every layer
    compressed = cache.checkpoint()
    results = [{"report": r, "keep": span_keep_rates(cache, row, jobs[row]), "answers": []}
               for row, r in enumerate(reports)]
    for turn in range(len(jobs[0].users)):
        user, user_real = pad([j.user_ids[turn] for j in jobs], device)
        answers = generate(model, cache, user, max_new_tokens, real=user_real)
        for result, answer in zip(results, answers):
            result["answers"].append(answer)
        cache.restore(compressed)                                       # back to the compressed system turn
    return results


def span_keep_rates(cache, row: int, job: Job) -> dict:
    """Mean keep rate (fraction of KV heads keeping a token, averaged over layers) per named span.

    "directive" is PREPEND + directive; "defense" every other token, template tokens included
    (the paper's buckets). With fair eviction, "partitions" gives the rate of each partition
    as fair eviction sees it (the first owns the template head, the last the tail).
    """
    rate = cache.keep_rate(row)
    out = {}
    for name, spans in job.spans.items():
        picked = torch.cat([rate[s:e] for s, e in spans])
        out[name] = round(float(picked.mean()), 6) if len(picked) else None
    if job.spec.partitions:
        spans = covering_spans(job.spec.partitions, len(job.system_ids))
        out["partitions"] = [round(float(rate[s:e].mean()), 6) for s, e in spans]
    return out


# ----------------------------------------------------------------------------- records, resume, output

class RunFolder:
    """The output folder: run.json (settings), a JSONL of records, summary.json, figures."""

    def __init__(self, path: str, settings: dict, records_name: str):
        self.path, self.settings = path, settings
        self.records_path = os.path.join(path, records_name)

    def check(self):
        """Refuse a folder that holds a run with other settings (before anything is written)."""
        run_json = os.path.join(self.path, "run.json")
        if os.path.isfile(run_json):
            with open(run_json) as f:
                try:
                    previous = json.load(f)
                except json.JSONDecodeError:
                    raise UsageError(f"{run_json} is corrupt: delete the folder or choose another --out") from None
            if previous != self.settings:
                changed = sorted(k for k in set(previous) | set(self.settings) if previous.get(k) != self.settings.get(k))
                raise UsageError(f"--out {self.path!r} holds a run with other settings ({', '.join(changed)}): "
                                 "choose another --out or delete it")
        elif os.path.exists(self.records_path):
            raise UsageError(f"{self.records_path} exists without run.json: choose another --out")

    def start(self) -> dict:
        """Create the folder and return the records already there, by job key (a torn last line is dropped)."""
        os.makedirs(self.path, exist_ok=True)
        write_json(os.path.join(self.path, "run.json"), self.settings)
        done = {}
        if os.path.isfile(self.records_path):
            with open(self.records_path, "rb") as f:
                lines = f.read().split(b"\n")
            good = []
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break                                                # a run killed mid-line
                done.setdefault(record["job"], []).append(record)
                good.append(line)
            with open(self.records_path, "wb") as f:                     # drop the torn tail, if any
                f.write(b"".join(g + b"\n" for g in good))
        return done

    def append(self, records: list[dict]):
        with open(self.records_path, "a") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, obj):
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(folder: str) -> str:
    """Identify the checkpoint by its config and file sizes (cheap; weights are not hashed)."""
    files = sorted((n, os.path.getsize(os.path.join(folder, n))) for n in os.listdir(folder)
                   if n.endswith((".json", ".safetensors", ".model")))
    return fingerprint(files + [open(os.path.join(folder, "config.json")).read()])


def run_jobs(jobs: list[Job], model, tok, folder: RunFolder, batch_size: int, max_new_tokens: int,
             to_records, label: str):
    """Run every job not yet recorded, in fixed batches, appending records as batches finish."""
    done = folder.start()
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    todo = [b for b in batches if any(j.key not in done for j in b)]
    n_done = len(jobs) - sum(len(b) for b in todo)
    if n_done:
        print(f"resuming: {n_done} of {len(jobs)} jobs already in {folder.records_path}", file=sys.stderr)
    progress = make_progress(total=len(jobs), initial=n_done, label=label)
    for batch in todo:                     # a batch is rerun whole, so its rows see the same padding as before
        results = run_batch(model, batch, max_new_tokens)
        records = []
        for job, result in zip(batch, results):
            if job.key not in done:
                records += to_records(job, result, tok)
        folder.append(records)
        progress.update(len(batch))
    progress.close()


def make_progress(total: int, initial: int, label: str):
    """A progress bar on stderr with prompts per second and time left."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=label, unit="prompt", file=sys.stderr, mininterval=2.0)


def group_by_setting(records: list[dict]) -> dict:
    """{"policy|remedy": {ratio: [records]}}, both levels sorted: summaries come out in one order."""
    groups = {}
    for r in records:
        groups.setdefault(f"{r['policy']}|{r['remedy']}", {}).setdefault(r["ratio"], []).append(r)
    return {s: dict(sorted(by_ratio.items())) for s, by_ratio in sorted(groups.items())}


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main_guard(main):
    """Run `main`; bad input becomes one line on stderr and exit code 2."""
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished records are kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def setup(args, parse_defense=True):
    """Validate the flags shared by both scripts and load the prompts; nothing is written here."""
    policies = parse_policies(args.policy)
    ratios = parse_ratios(args.ratios)
    if not 0 <= args.debias <= 1:
        raise UsageError(f"--debias {args.debias} is outside [0, 1]")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be at least 1")
    try:
        defense = P.resolve_defense(args.defense, args.defense_file)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UsageError(f"--defense {args.defense!r}: {e}") from None
    prompts = load_prompts(args)
    if not prompts:
        raise UsageError("no prompts to run")
    return policies, ratios, defense, prompts


def load_model_and_tokenizer(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    return model, load_tokenizer(args.model)
