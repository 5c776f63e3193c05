"""The loop shared by evaluate.py and leak.py: build prompts -> compress -> generate -> score -> write.

An `Experiment` says what a script measures: its own flags and the `Design` they make
(the user turns answered from each compressed system turn, how an answer is scored), and
how the records are summarised, printed and plotted. `run(experiment, argv)` is the one
loop both scripts use:

    flags.py: parse the flags -> a checked Plan (nothing heavy) | then, from the plan only:
    open --out (locked, checked) -> tokenizer and config.json -> build the jobs (every prompt
    rendered: the last text check) -> load the weights -> run them in batches, resuming
    -> summary.json -> table -> figures

A run is a list of *jobs*: one system prompt under one *setting* (setting.py: policy and
allocation with their options, compression mode, remedy) and one ratio. A job's system
turn is prefilled and compressed once; then each of its user turns (the task, or the
attacks) is answered from that compressed cache, returning to it in between.

Batches never mix settings or ratios: the jobs of one (setting, ratio) are cut into
batches of --batch-size in prompt order, so a job's batch, and with it its answer, never
depends on which other policies, ratios or remedies a run holds, or on resuming.

Results survive a kill: every finished batch appends its jobs' records to a JSONL file
in the output folder, and a rerun with the same settings skips the jobs whose records
are all there; a job cut off between two of its records, or a record cut before its
newline, is dropped and run again. Settings live in run.json; a folder holding a run with
other settings is refused. One run writes a folder at a time (RunFolder's locks).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch

import prompts as P
from decoding import Cuts, Decoding
from flags import DEFAULT_MODEL, Plan, UsageError, fingerprint, load_prompts, normal_settings, parse_args, plan_run
from model import ModelArgs, generate, load_model, pad, read_config
from policies import REPLAYS, Compression, Replay, compress, covering_spans, prefill
from setting import Setting
from tokenizer import load_tokenizer

# What a run costs with the bundled model on the project's 2-core CPU (AMD EPYC), in seconds: the fixed cost
# (python and torch imports, tokenizer, 538 MB of weights, summary and figures), each padded token of a
# batch's prefills (system turns with their compression, then each user turn; KVzip also replays the system
# turn: `replay` times as long), each decode step of a batch (`step` + rows x `row_step`). Measured one thread
# a process (OMP_NUM_THREADS=1) on a shared machine (load 5): the demo preset took 275 s (estimate 297 s), 24
# jobs of 32 tokens at batch 4 106 s (90 s), 2 jobs of 16 tokens 19 s (18 s). bfloat16 scaled by the README's
# batched-evaluation ratio (101 vs 59.1 prompts/min). Answers that stop early, or both cores free, make it
# high; a busier machine makes it low.
RUN_COSTS = dict(fixed=13.0, prompt_token=0.008, replay=2.2, step=0.1, row_step=0.02,
                 dtype={"float32": 1.0, "bfloat16": 59.1 / 101, "float16": 1.0})


# ----------------------------------------------------------------------------- what a script describes

@dataclass
class Experiment:
    """One script: its flags and defaults, and the steps of `run` that are its own."""
    name: str                                    # progress label
    description: str                             # --help (the script's docstring)
    records_name: str                            # the JSONL in --out
    paper_data: str                              # the paper's file that --data paper means (paperdata.py)
    defaults: dict                               # flag defaults (the "demo" preset)
    presets: dict[str, dict]                     # --preset NAME -> the defaults it changes
    add_arguments: Callable                      # (parser) -> None: the script's own flags
    design: Callable                             # (args, prompts) -> flags.Design; validates its flags, raises UsageError
    summarize: Callable                          # (records, {label: setting fields}) -> dict, merged into summary.json
    print_summary: Callable                      # (summary, file) -> None
    figures: Callable                            # (summary, records, out, example) -> [paths written]
    load_prompts: Callable = load_prompts        # (args, paper_data) -> prompts: --data, --limit, --seed


def expected_minutes(plan: Plan, jobs: list, done: set[str] = frozenset(), ranks: int = 1) -> float:
    """The run's time for the bundled model on a 2-core CPU (RUN_COSTS): the fixed start and end, then for
    each batch still to run its prefills (padded tokens) and --max-new-tokens decode steps per user turn,
    shared by the ranks."""
    costs, seconds = RUN_COSTS, 0.0
    for batch in make_batches(jobs, plan.batch_size):
        if all(job.key in done for job in batch):
            continue
        system = len(batch) * max(len(job.system_ids) for job in batch)            # padded, as run_batch feeds them
        users = sum(len(batch) * max(len(job.user_ids[turn]) for job in batch) for turn in range(len(batch[0].users)))
        replay = costs["replay"] if batch[0].replay is not None else 1.0
        steps = len(batch[0].users) * plan.max_new_tokens
        seconds += costs["dtype"][plan.dtype] * ((system * replay + users) * costs["prompt_token"]
                                                 + steps * (costs["step"] + len(batch) * costs["row_step"]))
    return (costs["fixed"] + seconds / ranks) / 60


# ----------------------------------------------------------------------------- jobs

@dataclass
class Job:
    """One system prompt under one setting and ratio, with the user turns to answer from it."""
    setting: Setting
    ratio: float
    prompt: P.Prompt
    system: P.SystemMessage
    users: list[tuple[str, str]]         # (name, text): "task", or attack names
    system_ids: list[int] = field(default_factory=list)
    user_ids: list[list[int]] = field(default_factory=list)
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # token spans by name (the layout's)
    spec: Compression | None = None
    decoding: Decoding | None = None     # compression during decoding, with the job's remedies
    replay: Replay | None = None         # how a replaying policy (KVzip) has the model repeat the system turn

    @property
    def key(self) -> str:
        return f"{self.setting.label}|{self.ratio}|{self.prompt.key}"


def token_spans(encoding, char_spans) -> list[tuple[int, int]]:
    """Token spans of the system message for char spans; a token straddling a border goes to the later piece."""
    starts = sorted({encoding.token_span(0, s, e)[0] for s, e in char_spans})
    ends = starts[1:] + [encoding.token_span(0, *char_spans[-1])[1]]
    return list(zip(starts, ends))


def whitelist_char_spans(system: P.SystemMessage, phrase: str, key: str) -> list[tuple[int, int]]:
    """Character spans to keep for one --whitelist phrase. "defense" = the defense's must-keep phrases,
    at the spans prompts.py recorded in the template (a directive with the same words is not them);
    any other phrase is searched in the system message."""
    if phrase == "defense":
        spans = [system.spans[f"whitelist:{j}"] for j in range(len(system.whitelist))]
        if not spans:
            raise UsageError("--whitelist defense: this defense has no must-keep phrase; give the phrase itself")
        return spans
    at = system.text.find(phrase)
    if at < 0:
        raise UsageError(f"--whitelist {phrase!r} is not in the system message of prompt {key}")
    return [(at, at + len(phrase))]


def system_parts(encoding, system: P.SystemMessage) -> list[tuple[int, int]]:
    """Token spans of the system turn's parts, contiguous and covering it: the template's role header, each
    defense side, PREPEND, each instruction (or the directive as one piece when the instruction texts are
    unknown), the template's end of turn. A token straddling a border goes to the later part (token_spans)."""
    pieces = [span for name, span in system.partitions() if name != "system_prompt"]
    if "prepend" in system.spans:
        pieces.append(system.spans["prepend"])
    instructions = [span for name, span in system.spans.items() if name.startswith("instruction:")]
    pieces += instructions or [system.spans["directive"]]
    parts = token_spans(encoding, sorted(pieces))
    head, tail = (0, parts[0][0]), (parts[-1][1], len(encoding.ids))
    return [span for span in [head, *parts, tail] if span[1] > span[0]]


def boundaries(parts: list[tuple[int, int]], n: int) -> list[int]:
    """The first and last n positions of each span (all of a span no longer than 2n), sorted."""
    positions = set()
    for start, end in parts:
        positions.update(range(start, min(start + n, end)), range(max(end - n, start), end))
    return sorted(positions)


def prepare_job(job: Job, encode, max_positions: int, max_new_tokens: int, replay=None, layout=None):
    """Tokenise the job's turns, find its spans and whitelist, and build its Compression. Raises UsageError.

    `encode(system, user)` is the tokenizer's chat_ids, `replay(system encoding)` its replay (KVzip), `layout`
    the Design's (default prompt_layout: the instruction prompts' directive and defense).
    """
    system, full = None, []
    for _, user in job.users:
        try:
            system, enc = encode(job.system.text, user)
        except ValueError as e:
            raise UsageError(f"prompt {job.prompt.key}: {e}") from None
        full.append(enc.ids[len(system.ids):])
    job.system_ids, job.user_ids = system.ids, full
    try:
        job.replay = replay(system) if replay is not None and job.setting.policy in REPLAYS else None
    except ValueError as e:                                         # the template refuses the replay's user turn
        raise UsageError(f"prompt {job.prompt.key}: {job.setting.policy}'s replay of the system turn: {e}") from None
    longest = longest_cache(job, max_new_tokens)
    if longest > max_positions:
        raise UsageError(f"prompt {job.prompt.key} needs {longest} positions with --max-new-tokens, more than the "
                         f"model's context of {max_positions}: lower --max-new-tokens, or shorten the prompt (RULER's: "
                         "--length)")
    job.spans, positions, partitions = (layout or prompt_layout)(job, system)
    remedy = job.setting.remedy
    job.spec = Compression(job.setting.policy, job.ratio, partitions=partitions,
                           whitelist=sorted(set(positions)) or None,
                           debias=remedy.debias if partitions else 1.0, options=job.setting.options,
                           allocation=job.setting.allocation, allocation_options=job.setting.allocation_options)
    setting = job.setting
    if setting.decode_target is not None:
        try:
            job.decoding = Decoding(job.spec, setting.decode_target, setting.decode_interval, setting.decode_buffer,
                                    setting.rerotate)
        except ValueError as e:
            raise UsageError(f"prompt {job.prompt.key}: --decode-target: {e}") from None


def prompt_layout(job: Job, system) -> tuple[dict, list[int], list[tuple[int, int]] | None]:
    """The instruction prompts' layout of a system turn (`system` its encoding): the token spans of "directive"
    and "defense" (the keep rates' buckets), the positions the remedy whitelists (--whitelist, --protect), and
    the partitions of fair eviction (or None)."""
    spans = {}
    directive = job.system.spans["system_prompt"]
    spans["directive"] = [system.token_span(0, *directive)]
    spans["defense"] = [(0, spans["directive"][0][0]), (spans["directive"][0][1], len(system.ids))]
    remedy = job.setting.remedy
    positions = []
    for phrase in remedy.whitelist:
        for start, end in whitelist_char_spans(job.system, phrase, job.prompt.key):
            positions += range(*system.token_span(0, start, end))
    if remedy.protect:
        positions += boundaries(system_parts(system, job.system), remedy.protect)
    partitions = None
    if remedy.fair == "defense":
        partitions = token_spans(system, [span for _, span in job.system.partitions()])
    elif remedy.fair == "instructions":
        n = len(job.prompt.instructions)
        if not all(f"instruction:{i}" in job.system.spans for i in range(n)):
            raise UsageError(f"--fair instructions needs instruction texts; prompt {job.prompt.key} has none "
                             "(the paper's data gives one directive text): use --fair defense")
        pieces = [span for name, span in job.system.partitions() if name != "system_prompt"]
        start, end = directive
        bounds = [start] + [job.system.spans[f"instruction:{i}"][0] for i in range(1, n)] + [end]
        pieces += list(zip(bounds, bounds[1:]))
        partitions = token_spans(system, sorted(pieces))
    return spans, positions, partitions


def build_jobs(plan: Plan, tok, max_positions: int) -> list[Job]:
    """Every (setting, ratio, prompt), in that order, prepared."""
    encode = functools.lru_cache(maxsize=None)(tok.chat_ids)        # jobs share prompts
    prefix = plan.design.answer_prefix or (lambda prompt: "")
    jobs = []
    for setting in plan.settings:
        for ratio in plan.ratios:
            for prompt in plan.design.prompts:
                users = [(name, prompt.task if text is None else text) for name, text in plan.design.turns]
                job = Job(setting, ratio, prompt, plan.design.system_message(prompt, plan.defense), users)
                prepare_job(job, functools.partial(encode, answer_prefix=prefix(prompt)), max_positions,
                            plan.max_new_tokens, tok.replay, plan.design.layout)
                jobs.append(job)
    check_decode_targets(jobs, plan.max_new_tokens)
    return jobs


def longest_cache(job: Job, max_new_tokens: int) -> int:
    """The most entries the job's cache can hold: its system turn, its longest user turn, a whole answer."""
    return len(job.system_ids) + max(map(len, job.user_ids)) + max_new_tokens


def check_decode_targets(jobs: list[Job], max_new_tokens: int):
    """Refuse a --decode-target that no cache of the run grows past: its cuts would never evict, and its records
    would carry a compression that did not happen."""
    targets = {job.setting.decode_target for job in jobs} - {None}
    if not targets:
        return
    longest = max(jobs, key=lambda job: longest_cache(job, max_new_tokens))
    size = longest_cache(longest, max_new_tokens)
    if max(targets) >= size:
        raise UsageError(f"--decode-target {max(targets)}: no cache of this run grows past {size} entries (prompt "
                         f"{longest.prompt.key}: system turn, user turn and --max-new-tokens), so its cuts would "
                         f"evict nothing: give targets below {size}")


def make_batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Batches of one (setting, ratio) each, cut in job order: a batch depends only on its own setting's jobs."""
    groups: dict[tuple[str, float], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.setting.label, job.ratio), []).append(job)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


# ----------------------------------------------------------------------------- running

def run_batch(model, jobs: list[Job], max_new_tokens: int) -> list[dict]:
    """Prefill and compress the jobs' system turns together, then answer each user turn from them.

    The jobs share one setting and ratio (make_batches), so every row prefills the same way:
    with H2O, through the attention that also sums what each key receives, else flash attention.
    """
    if len({(j.setting.label, j.ratio) for j in jobs}) != 1:
        raise ValueError("run_batch: a batch must hold one setting and ratio")
    if jobs[0].setting.query_aware:
        return run_batch_query_aware(model, jobs, max_new_tokens)
    device = model.device
    tokens, real = pad([j.system_ids for j in jobs], device)
    cache = model.new_cache(len(jobs), capacity=tokens.shape[1] + 16)
    replays = [j.replay for j in jobs] if jobs[0].replay is not None else None        # KVzip repeats the turn
    compressed = prefill(model, cache, tokens, [j.spec for j in jobs], real=real, replay=replays)   # once, every layer
    kept = [what_was_kept(compressed, row, job) for row, job in enumerate(jobs)]
    saved = cache.checkpoint()
    results = [{"turns": [], "answers": []} for _ in jobs]
    for turn in range(len(jobs[0].users)):
        for result, kept_row in zip(results, kept):
            result["turns"].append(kept_row)                            # every turn answers from the same
        answer(model, cache, jobs, results, *pad([j.user_ids[turn] for j in jobs], device), max_new_tokens)
        cache.restore(saved)                                            # back to the compressed system turn
    return results


def run_batch_query_aware(model, jobs: list[Job], max_new_tokens: int) -> list[dict]:
    """--query-aware: prefill the system turns once; for each user turn, from that uncompressed prefill,
    prefill the user turn, compress the two together (only the system turn's entries are evictable),
    answer, and go back.

    The user turn's last token (the end of the template's generation prompt) is left out of the
    compressed prefill and fed after compression, so that the first answer token, like every
    other, is computed from the compressed cache, as in the system-turn-alone protocol.
    """
    device = model.device
    tokens, real = pad([j.system_ids for j in jobs], device)
    longest_user = max(len(ids) for j in jobs for ids in j.user_ids)
    cache = model.new_cache(len(jobs), capacity=tokens.shape[1] + longest_user + 16)
    cache.record_queries()                 # no observer: H2O sums what the system and user queries pay itself
    model(tokens, cache, real=real)                                     # the system turn's prefill
    system_prefill = cache.checkpoint()                                 # uncompressed, with its queries
    system_len = [len(j.system_ids) for j in jobs]
    results = [{"turns": [], "answers": []} for _ in jobs]
    for turn in range(len(jobs[0].users)):
        cache.restore(system_prefill)
        user, user_real = pad([j.user_ids[turn][:-1] for j in jobs], device)
        model(user, cache, real=user_real)                              # the user turn, but its last token
        compressed = compress(cache, [j.spec for j in jobs], system_len=system_len)
        for row, result in enumerate(results):
            result["turns"].append(what_was_kept(compressed, row, jobs[row]))
        last = torch.tensor([[j.user_ids[turn][-1]] for j in jobs], device=device)   # (B, 1)
        answer(model, cache, jobs, results, last, None, max_new_tokens)
    return results


def answer(model, cache, jobs: list[Job], results: list[dict], tokens, real, max_new_tokens: int):
    """Generate each row's answer to one turn after what the cache holds, with the jobs' decode-time cuts if
    they have any, and add it (and what the system turn kept to the end) to the row's result."""
    cuts = None if jobs[0].decoding is None else Cuts([j.decoding for j in jobs])
    for row, ids in enumerate(generate(model, cache, tokens, max_new_tokens, real=real, cuts=cuts)):
        results[row]["answers"].append(ids)
        if cuts is not None:
            rate = cuts.kept_at_end[row][:len(jobs[row].system_ids)]
            results[row].setdefault("keep_end", []).append(span_keep_rates(rate, jobs[row]))


def what_was_kept(compressed, row: int, job: Job) -> dict:
    """One row's compression: compress()'s report, the keep rate per named span and per system token."""
    rate = compressed.keep_rate(row)                                    # (L,) per system token
    return {"report": compressed.reports[row], "keep": span_keep_rates(rate, job),
            "token_keep": [round(x, 4) for x in rate.tolist()]}


def span_keep_rates(rate: torch.Tensor, job: Job) -> dict:
    """Mean keep rate (fraction of KV heads keeping a token, averaged over layers) per named span.

    `rate` (L,) is Compressed.keep_rate(row). The names are the layout's: for the instruction prompts
    "directive" is PREPEND + directive, "defense" every other token, template tokens included (the
    paper's buckets); for RULER prompts "facts", "haystack", ... (evaluate.ruler_layout). With fair eviction,
    "partitions" gives the rate of each partition as fair eviction sees it (the first owns
    the template head, the last the tail).
    """
    out = {}
    for name, spans in job.spans.items():
        picked = torch.cat([rate[s:e] for s, e in spans])
        out[name] = round(float(picked.mean()), 6) if len(picked) else None
    if job.spec.partitions:
        spans = covering_spans(job.spec.partitions, len(job.system_ids))
        out["partitions"] = [round(float(rate[s:e].mean()), 6) for s, e in spans]
    return out


def to_records(job: Job, result: dict, tok, score: Callable) -> list[dict]:
    """One record per user turn: what every record holds, plus what the script scores (`score(job, turn, response)`,
    the Design's)."""
    records = []
    decode = None if job.decoding is None else dict(target=job.decoding.target, interval=job.decoding.interval,
                                                    buffer=job.decoding.buffer, rerotate=job.decoding.rerotate)
    for number, ((turn, user), answer) in enumerate(zip(job.users, result["answers"])):
        compressed = result["turns"][number]                            # what the answer's cache kept
        report = compressed["report"]
        response = tok.decode(answer, skip_special=True)
        record = dict(job=job.key, records_in_job=len(job.users), setting=job.setting.label,
                      policy=job.setting.policy, options=job.setting.options, ratio=job.ratio,
                      remedy=job.setting.remedy.name, query_aware=job.setting.query_aware, key=job.prompt.key,
                      turn=turn, user=user, response=response, new_tokens=len(answer),
                      system_tokens=report["system_len"], n_kept=report["n_kept"], keep=compressed["keep"],
                      token_keep=compressed["token_keep"], whitelist_kept=report.get("whitelist_kept"),
                      decode=decode, keep_end=result["keep_end"][number] if "keep_end" in result else None)
        record.update(score(job, turn, response))
        records.append(record)
    return records


# ----------------------------------------------------------------------------- shards: one process per GPU

@dataclass
class Shard:
    """Which share of the batches this process runs: batch i goes to rank i mod world_size.

    Set by torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or by SLURM's srun (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID, read only when MASTER_ADDR and MASTER_PORT say where rank 0
    listens); without them, one process runs everything and nothing changes. The ranks only
    talk to agree on errors and to wait for each other at the end; each appends to its own
    records file, and rank 0 merges them.
    """
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @staticmethod
    def from_env(env=os.environ) -> "Shard":
        if "RANK" in env and "WORLD_SIZE" in env:
            names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env and "MASTER_PORT" in env:
            names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        else:
            return Shard()
        try:
            rank, world_size, local_rank = (int(env.get(name, "0")) for name in names)
        except ValueError:
            raise UsageError(f"{', '.join(names)} must be integers, got "
                             f"{', '.join(repr(env.get(n)) for n in names)}") from None
        if not 0 <= rank < world_size or local_rank < 0:
            raise UsageError(f"{names[0]}={rank} is not a rank of {names[1]}={world_size}")
        return Shard(rank, world_size, local_rank)

    def device(self, device: str) -> str:
        """--device cuda is this process's GPU: cuda:LOCAL_RANK."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world_size > 1 else device

    def start(self, device: str):
        """Join the other ranks (gloo on CPU, nccl on CUDA); a no-op for a single process."""
        if self.world_size == 1:
            return
        import datetime
        import signal
        import torch.distributed as dist
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(self.local_rank)
        # The last barrier waits for the slowest rank: allow a long sweep. A rank that dies
        # breaks the others' connections at once; torchrun also stops them.
        dist.init_process_group("nccl" if cuda else "gloo", rank=self.rank, world_size=self.world_size,
                                timeout=datetime.timedelta(hours=72))
        signal.signal(signal.SIGTERM, stopped_by_signal)            # torchrun stops the others when one rank dies

    def stop(self):
        if self.world_size > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

    def agree(self, step: Callable):
        """Run `step` on every rank; if it raised a UsageError on any rank, raise the first one on all of them
        (rank 0 prints it, so a refusal is one line), else return this rank's result."""
        try:
            result, message = step(), None
        except UsageError as e:
            result, message = None, str(e)
        if self.world_size > 1:
            import torch.distributed as dist
            messages = [None] * self.world_size
            self.collective(lambda: dist.all_gather_object(messages, message))
            message = next((m for m in messages if m is not None), None)
        if message is not None:
            error = UsageError(message)
            error.quiet = self.rank != 0
            raise error
        return result

    def barrier(self):
        if self.world_size > 1:
            import torch.distributed as dist
            self.collective(dist.barrier)

    def collective(self, call: Callable):
        try:
            call()
        except RuntimeError as e:                                     # a peer died or hung (DistBackendError too)
            raise ShardStopped(f"rank {self.rank} of {self.world_size}: another rank stopped ({str(e).splitlines()[0]}); "
                               "finished jobs are kept: rerun the same command to resume") from None


class ShardStopped(Exception):
    """Another rank died: printed as one line, exit code 1."""


def stopped_by_signal(signum, frame):
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------- records, resume, output

LOCK = ".nanokv.lock"                   # in --out: held by the process that writes run.json and the summary
RANK_LOCK = ".nanokv.rank{}.lock"       # held by rank R >= 1 of a sharded run, which appends to its own file


class FolderInUse(UsageError):
    """Another process holds the run folder: one line, exit code 2, nothing written."""


def take_lock(path: str, holder: str) -> int:
    """An exclusive flock on the file `path` (created if missing), held until `release_lock`; `holder` (pid,
    host) is written into it for the message a second process gets. Raises FolderInUse naming the holder.

    The lock dies with its process (a kill never leaves the folder locked). Its file is removed on
    release, so a process that opened the file just before is left holding a lock on a removed
    file: it sees that the path names another file now, or none, and tries again.
    """
    import fcntl
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            import time
            for _ in range(20):                                  # the holder writes its name just after locking
                text = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip()
                if text:
                    break
                time.sleep(0.01)
            os.close(fd)
            raise FolderInUse(text or "another process (it has not said which yet)") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder + "\n").encode("utf-8", "replace"), 0)
            return fd
        os.close(fd)                                             # its last holder removed it: lock the new one


def release_lock(fd: int, path: str):
    """Remove the lock's file, then the lock (closing its descriptor releases it)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)


class RunFolder:
    """The output folder: run.json (settings), JSONL files of records, summary.json, figures.

    A single process appends to `records_name` (e.g. responses.jsonl); rank R of a sharded run
    to responses.rankR.jsonl. Reading takes every such file in the folder, whatever world size
    wrote it: a job is known by its key, not by the rank that ran it.

    One writer per folder: a run holds locks in it from `open()` to `close()` (take_lock). The
    process that writes run.json, cleans the records and writes the summary (a single process, or
    rank 0) holds LOCK; rank R >= 1 holds RANK_LOCK of R (`lock_rank`), and rank 0, or a single
    process, also holds the rank locks that no rank of its own run takes, so a rank left over
    from an earlier run still appending is found too. A second run on the folder is refused in
    one line before it writes anything.
    """

    def __init__(self, path: str, settings: dict, records_name: str, shard: Shard = Shard()):
        self.path, self.settings, self.shard = path, settings, shard
        self.stem, self.extension = os.path.splitext(records_name)
        own = records_name if shard.world_size == 1 else f"{self.stem}.rank{shard.rank}{self.extension}"
        self.records_path = os.path.join(path, own)
        self.locks: list[tuple[int, str]] = []                   # (descriptor, path) of the locks held
        self.created = []                                        # folders open() made (close() removes them if empty)
        self.duplicates = 0                                      # record lines read_finished found twice

    def record_files(self) -> list[str]:
        """Every records file in the folder: the single-process one first, then the ranks' in rank order."""
        if not os.path.isdir(self.path):
            return []
        pattern = re.compile(rf"{re.escape(self.stem)}(?:\.rank(\d+))?{re.escape(self.extension)}")
        found = [(m.group(1) is not None, int(m.group(1) or 0), name) for name in os.listdir(self.path)
                 if (m := pattern.fullmatch(name))]
        return [os.path.join(self.path, name) for _, _, name in sorted(found)]

    def open(self):
        """check() under the folder's lock: how a run opens --out, before any work. On rank 0 or a single
        process it creates the folder and any missing parents (close() removes them again if the run writes
        nothing)."""
        self.check_path()
        if self.shard.rank == 0:
            missing, folder = [], os.path.abspath(self.path)
            while not os.path.exists(folder):
                missing.append(folder)
                folder = os.path.dirname(folder)
            for folder in reversed(missing):                     # the outermost first
                try:
                    os.mkdir(folder)
                    self.created.append(folder)
                except FileExistsError:                          # another process made it meanwhile
                    pass
                except OSError as e:
                    raise UsageError(f"--out {self.path!r} cannot be made ({e.strerror}): choose another --out") from None
            self.lock(LOCK, "")
        self.check()

    def lock_rank(self):
        """The rank locks: rank R >= 1 takes its own; rank 0, or a single process, every other one in the folder
        (the ranks of an earlier, larger run). Taken once the run is about to write, after the weights load, so
        a refused run leaves no lock file behind."""
        if self.shard.rank > 0:
            self.lock(RANK_LOCK.format(self.shard.rank), f" rank {self.shard.rank} of {self.shard.world_size}")
            return
        pattern = re.compile(re.escape(RANK_LOCK).replace(r"\{\}", r"(\d+)"))
        for name in sorted(os.listdir(self.path)):
            if (m := pattern.fullmatch(name)) and not 0 < int(m.group(1)) < self.shard.world_size:
                self.lock(name, f" in place of rank {m.group(1)} of an earlier run")

    def lock(self, name: str, role: str):
        """Take the lock `name` in the folder, saying who holds it: "pid 4242 on host node1 (evaluate.py rank 1
        of 2, since 2025-12-07 04:10:00)"."""
        import socket
        import time
        script = os.path.basename(sys.argv[0]) or "python"
        holder = (f"pid {os.getpid()} on host {socket.gethostname()} ({script}{role}, "
                  f"since {time.strftime('%Y-%m-%d %H:%M:%S')})")
        try:
            self.locks.append((take_lock(os.path.join(self.path, name), holder), os.path.join(self.path, name)))
        except FolderInUse as e:
            raise FolderInUse(f"--out {self.path!r} is in use: {e}; one run writes a folder at a time: wait for it "
                              "to end, or choose another --out") from None

    def close(self):
        """Release the locks; remove the folder if open() made it and nothing was written into it."""
        while self.locks:
            release_lock(*self.locks.pop())
        while self.created:
            try:
                os.rmdir(self.created.pop())                     # the innermost first, and only when empty
            except OSError:
                break
        self.created = []

    def check_path(self):
        """Refuse a --out that is empty, a file or cannot be written."""
        if not self.path.strip():
            raise UsageError(f"--out {self.path!r} names no folder: give one, e.g. --out runs/mine")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UsageError(f"--out {self.path!r} is a file, not a folder: choose another --out")
        existing = os.path.abspath(self.path)
        while not os.path.exists(existing):                      # the folder that makedirs would write into
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UsageError(f"--out {self.path!r}: {existing!r} is a file, not a folder: choose another --out")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            raise UsageError(f"--out {self.path!r} cannot be written ({e.strerror} in {existing!r}): "
                             "choose another --out") from None

    def check(self):
        """Refuse, before any work, a --out that is a file, cannot be written, or holds a run with other settings."""
        self.check_path()
        run_json = os.path.join(self.path, "run.json")
        for path in [run_json, os.path.join(self.path, "summary.json"), *self.record_files()]:
            if os.path.isdir(path):
                raise UsageError(f"{path} is a folder, not a file: choose another --out")
        if os.path.isfile(run_json):
            with open(run_json, "rb") as f:
                try:
                    previous = json.load(f)
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                    previous = None
            if not isinstance(previous, dict):
                raise UsageError(f"{run_json} is corrupt: delete the folder or choose another --out")
            previous = normal_settings(previous)
            if previous != self.settings:
                changed = sorted(k for k in set(previous) | set(self.settings) if previous.get(k) != self.settings.get(k))
                raise UsageError(f"--out {self.path!r} holds a run with other settings ({', '.join(changed)}): "
                                 "choose another --out or delete it")
        elif self.record_files():
            raise UsageError(f"{self.record_files()[0]} exists without run.json: choose another --out")
        self.records, self.complete, self.torn = self.read_finished()

    def read_finished(self) -> tuple[list[dict], set[str], bool]:
        """The records of the jobs whose records are all there, their keys, and whether a last line was torn.

        A record names its job and how many records the job writes. A job that a kill cut short
        between two of its records is left out (it runs again and writes each record once), and
        so is a file's last line when it lacks its newline (a record is written with its newline
        in one write: a line without one was cut mid-write, even if it parses) or is not JSON; any
        other unreadable line is refused. A record found twice, in one file or two (two runs that
        once wrote the same folder), is kept once; two different records for one answer are refused.
        """
        records, torn, self.lines = [], False, {}
        for path in self.record_files():
            with open(path, "rb") as f:
                data = f.read()
            lines = data.split(b"\n")
            last = lines.pop()                                   # b"" when the file ends with its newline
            self.lines[path] = len(lines) + (last != b"")
            torn |= last != b""
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                    if not (isinstance(record, dict) and isinstance(record.get("job"), str)
                            and type(record.get("records_in_job")) is int and record["records_in_job"] >= 1):
                        raise ValueError("not a record")
                    records.append((path, record))
                except (ValueError, RecursionError):             # JSONDecodeError and UnicodeDecodeError too
                    if number < len(lines) or last != b"":
                        raise UsageError(f"{path}:{number} is not a JSON record (the file was edited?): "
                                         "delete that line or choose another --out") from None
                    torn = True                                  # written by a version that split its writes
        by_answer: dict[tuple[str, str], dict] = {}
        unique = []
        for path, record in records:
            answer = (record["job"], str(record.get("turn")))
            if answer in by_answer:
                if by_answer[answer] != record:
                    raise UsageError(f"{self.path} holds two different records of job {record['job']!r} (turn "
                                     f"{answer[1]!r}): two runs wrote it differently; choose another --out")
                continue                                         # the same record again: kept once
            by_answer[answer] = record
            unique.append((path, record))
        by_job: dict[str, list[dict]] = {}
        for _, record in unique:
            by_job.setdefault(record["job"], []).append(record)
        for job, rs in by_job.items():
            if len(rs) > rs[0]["records_in_job"]:
                raise UsageError(f"{self.path} holds job {job!r} more than once: choose another --out")
        complete = {job for job, rs in by_job.items() if len(rs) == rs[0]["records_in_job"]}
        self.duplicates = len(records) - len(unique)
        self.kept = {path: [r for p, r in unique if p == path and r["job"] in complete] for path in self.lines}
        return [r for _, r in unique if r["job"] in complete], complete, torn

    def check_jobs(self, jobs: list) -> list:
        """Refuse finished records of jobs this run does not have, or whose setting, ratio, prompt or records
        count is not their job's: the same settings make the same jobs, so they were edited. Returns the jobs."""
        by_key = {job.key: job for job in jobs}
        stray = sorted(self.complete - set(by_key))
        if stray:
            raise UsageError(f"{self.path} holds records of {len(stray)} job(s) this run does not have, e.g. "
                             f"{stray[0]!r} (the records were edited?): delete them or choose another --out")
        for record in self.records:
            job = by_key[record["job"]]
            if (record.get("setting"), record.get("ratio"), record.get("key"), record["records_in_job"]) != \
                    (job.setting.label, job.ratio, job.prompt.key, len(job.users)):
                raise UsageError(f"{self.path}: a record of job {job.key!r} names another setting, ratio, prompt "
                                 "or records count (the records were edited?): delete it or choose another --out")
        return jobs

    def start(self) -> set[str]:
        """Create the folder and write run.json; drop what check() found unfinished or twice; return the finished
        jobs.

        In a sharded run only rank 0 calls it, before any rank appends (every file is cleaned,
        whichever world size wrote it, so a job cut short in one file cannot count twice).
        """
        os.makedirs(self.path, exist_ok=True)
        write_json(os.path.join(self.path, "run.json"), self.settings)
        dropped = 0
        for path, kept in self.kept.items():
            if self.lines[path] > len(kept):
                dropped += self.lines[path] - len(kept)
                tmp = path + ".tmp"
                with open(tmp, "wb") as f:
                    f.writelines(record_line(r) for r in kept)
                os.replace(tmp, path)
        if dropped - self.duplicates:
            print(f"resuming: dropped {dropped - self.duplicates} record line(s) of jobs cut short by a kill"
                  f"{' (the last line torn)' if self.torn else ''}; those jobs run again", file=sys.stderr)
        if self.duplicates:
            print(f"resuming: {self.duplicates} record line(s) were there twice (two runs once wrote this folder "
                  "together): each is kept once", file=sys.stderr)
        return self.complete

    def append(self, records: list[dict]):
        """Append each record with its newline in one write (a kill or a full disk leaves a line whole, or cut
        without its newline: torn, see read_finished), then flush the batch to the disk."""
        fd = os.open(self.records_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for r in records:
                line = record_line(r)
                written = os.write(fd, line)
                while written < len(line):                       # a short write (a signal): finish the line
                    written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)


def record_line(record: dict) -> bytes:
    """A record as its line in a records file, newline included."""
    return (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def write_json(path: str, obj):
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def run_jobs(jobs: list[Job], model, folder: RunFolder, batch_size: int, max_new_tokens: int, to_records, label: str,
             shard: Shard = Shard()):
    """Run every job of this shard not yet recorded, in setting-pure batches, appending records as batches finish.

    The batches are cut from all jobs, the same for every world size, and rank R runs batches
    R, R + world_size, ...: a job's batch, and with it its answer, does not depend on the shard.
    """
    if shard.rank == 0:
        folder.start()
    shard.barrier()                        # run.json written and cut-short jobs dropped before any rank appends
    done = folder.complete
    batches = make_batches(jobs, batch_size)[shard.rank::shard.world_size]
    todo = [b for b in batches if any(j.key not in done for j in b)]
    n_mine = sum(len(b) for b in batches)
    n_done = sum(j.key in done for b in batches for j in b)
    where = f" (rank {shard.rank} of {shard.world_size}: {n_mine} of {len(jobs)} jobs)" if shard.world_size > 1 else ""
    if n_done:
        print(f"resuming{where}: {n_done} of {n_mine} jobs already in {folder.path}", file=sys.stderr)
    progress = make_progress(total=n_mine, initial=n_done, label=label + (f"[{shard.rank}]" if where else ""))
    for batch in todo:                     # a batch is rerun whole, so its rows see the same padding as before
        results = run_batch(model, batch, max_new_tokens)
        records = []
        for job, result in zip(batch, results):
            if job.key not in done:
                records += to_records(job, result)
        folder.append(records)
        progress.update(sum(j.key not in done for j in batch))
    progress.close()


def make_progress(total: int, initial: int, label: str):
    """A progress bar on stderr with prompts per second and time left."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=label, unit="prompt", file=sys.stderr, mininterval=2.0)


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def records_of(jobs: list[Job], paths: list[str] | str) -> list[dict]:
    """The records of exactly these jobs, each once and complete, in job order (whichever files and order
    the ranks wrote them in). Anything else is a bug, not bad input."""
    records = [r for path in ([paths] if isinstance(paths, str) else paths) for r in read_records(path)]
    counts: dict[str, int] = {}
    for r in records:
        counts[r["job"]] = counts.get(r["job"], 0) + 1
    wrong = [j.key for j in jobs if counts.get(j.key) != len(j.users)]
    if wrong or len(counts) != len(jobs):
        raise RuntimeError(f"{paths}: {len(wrong)} job(s) without exactly their records (e.g. {wrong[:1]}), "
                           f"{len(counts) - len(jobs) + len(wrong)} unknown")
    order = {j.key: i for i, j in enumerate(jobs)}
    return sorted(records, key=lambda r: order[r["job"]])            # stable: a job's records keep their order


def figure_example(job: Job, tok) -> dict:
    """What the token-level figure draws: one prompt's system tokens, as text, and its spans."""
    return {"key": job.prompt.key, "pieces": [tok.decode([i]) for i in job.system_ids],
            "spans": {name: [tuple(s) for s in spans] for name, spans in job.spans.items()}}


# ----------------------------------------------------------------------------- the loop

def load_text(folder: str):
    """What the text checks need, without the weights: the tokenizer and config.json's ModelArgs (the context
    length) of the checkpoint `folder`. A folder that is missing, incomplete or malformed is a UsageError."""
    try:
        model_args = ModelArgs.from_hf_config(read_config(folder))
        tok = load_tokenizer(folder)
        if tok.vocab_size > model_args.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, the model's embedding {model_args.vocab_size}: "
                             "they belong to different models")
    except (ValueError, OSError) as e:
        raise UsageError(f"--model {folder!r}: {e}") from None
    except KeyError as e:
        raise UsageError(f"--model {folder!r}: config.json lacks the field {e}") from None
    return tok, model_args


def load_weights(plan: Plan, device: str | None = None):
    """The plan's model (on `device`, default the plan's): what only the weights can refuse (a missing, unreadable
    or misshapen tensor) is a UsageError."""
    try:
        return load_model(plan.model, device=device or plan.device, dtype=plan.dtype)
    except (ValueError, OSError) as e:
        raise UsageError(f"--model {plan.model!r}: {e}") from None
    except KeyError as e:
        raise UsageError(f"--model {plan.model!r}: config.json lacks the field {e}") from None


def load_model_and_tokenizer(plan: Plan, device: str | None = None):
    """The tokenizer checked first, then the weights (bench scripts)."""
    tok, _ = load_text(plan.model)
    return load_weights(plan, device), tok


def run(experiment: Experiment, argv=None):
    """Parse -> plan (every flag checked) -> open --out (locked) -> tokenizer and jobs (every text check) -> load
    the weights -> batches (resumable) -> summary -> table -> figures.

    Under torchrun (or srun) each rank runs its share of the batches; a refusal on any rank
    stops every rank, and rank 0 merges the records once all are done.
    """
    args = parse_args(experiment, argv)
    shard = Shard.from_env()
    shard.start(args.device)                                        # the flags' one use before the plan: the backend
    try:
        plan = shard.agree(lambda: plan_run(experiment, args))     # every flag checked, nothing heavy loaded
        run_plan(experiment, plan, shard)
    finally:
        shard.stop()


def run_plan(experiment: Experiment, plan: Plan, shard: Shard):
    folder = RunFolder(plan.out, plan.run_settings, experiment.records_name, shard)
    try:
        run_in_folder(experiment, plan, shard, folder)
    finally:
        folder.close()                                              # the locks go; a folder made for nothing too


def run_in_folder(experiment: Experiment, plan: Plan, shard: Shard, folder: RunFolder):
    shard.agree(folder.open)                                        # before any work, on every rank: locked, checked
    tok, model_args = shard.agree(lambda: load_text(plan.model))    # no weights yet: every text check comes first
    jobs = shard.agree(lambda: folder.check_jobs(build_jobs(plan, tok, model_args.max_positions)))
    model = shard.agree(lambda: load_weights(plan, shard.device(plan.device)))
    shard.agree(folder.lock_rank)
    estimate = (f", about {expected_minutes(plan, jobs, folder.complete, shard.world_size):.1f} min on a 2-core CPU"
                if plan.device == "cpu" and os.path.abspath(plan.model) == DEFAULT_MODEL else "")
    if shard.rank == 0:
        ranks = f", {shard.world_size} ranks" if shard.world_size > 1 else ""
        print(f"{experiment.name}: {len(jobs)} jobs ({len(plan.settings)} settings x {len(plan.ratios)} ratios x "
              f"{len(plan.design.prompts)} prompts, {len(plan.design.turns)} answer(s) each{ranks}){estimate}",
              file=sys.stderr)
    run_jobs(jobs, model, folder, plan.batch_size, plan.max_new_tokens,
             lambda job, result: to_records(job, result, tok, plan.design.score), experiment.name, shard)
    shard.barrier()                                                 # every rank's records are in
    if shard.rank != 0:
        return
    files = folder.record_files()
    records = records_of(jobs, files)
    settings = {setting.label: setting.fields() for setting in plan.settings}
    with edited_records(plan.out, records, resumed=bool(folder.records)):
        summary = {"settings": settings, "run_settings": plan.run_settings, "run": fingerprint(plan.run_settings),
                   **experiment.summarize(records, settings)}
        write_json(os.path.join(plan.out, "summary.json"), summary)
        experiment.print_summary(summary, sys.stdout)
        figures = experiment.figures(summary, records, plan.out, figure_example(jobs[0], tok))
    print(f"\nwrote {', '.join(files)}, {os.path.join(plan.out, 'summary.json')}, "
          f"{', '.join(os.path.basename(f) for f in figures)}")


@contextlib.contextmanager
def edited_records(out: str, records: list[dict], resumed: bool):
    """Summing up records read back from --out: one that lacks a field the summary reads (KeyError), or holds a
    value of the wrong kind (TypeError), was edited by hand, so it is bad input. With only this run's records, a bug."""
    try:
        yield
    except (KeyError, TypeError) as e:
        if not resumed:
            raise
        lacking = [r["job"] for r in records if isinstance(e, KeyError) and e.args and e.args[0] not in r]
        where = f"a record of job {lacking[0]!r} lacks {e.args[0]!r}" if lacking else f"a record: {e}"
        raise UsageError(f"{out} cannot be summed up, {where} (the records were edited?): delete that job's "
                         "records to run it again, or choose another --out") from None


def main_guard(main):
    """Run `main`; a UsageError becomes one line on stderr and exit code 2 (in a sharded run, rank 0's line
    only, when every rank refused the same input). Anything else is a bug: traceback."""
    try:
        main()
    except UsageError as e:
        if not getattr(e, "quiet", False):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ShardStopped as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: finished jobs are kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
