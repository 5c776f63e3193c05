"""Flags in, a checked Plan out: the command line of evaluate.py and leak.py.

    args = parse_args(script, argv)     the flags, with the defaults of the chosen --preset
    plan = plan_run(script, args)       every flag checked, prompts and defense loaded, the settings
                                        built; reads files, loads no model, writes nothing

A `Plan` holds everything a run needs: its settings (setting.py) and ratios, the prompts and user
turns (`Design`, with the script's score function and its options bound), the run's resources
(model, device, dtype, batch size, answer length, output folder) and what run.json records.
Nothing below the plan reads the flags. Bad input raises `UsageError`: one line, exit code 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

import paperdata
import prompts as P
from decoding import Decoding
from model import DTYPES
from policies import ALLOCATIONS, POLICIES, REPLAYS, Compression, Context, option_defaults
from setting import Remedy, Setting

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "smollm2-135m-instruct")

# --protect's default N in leak.py's 'protect' remedy: StreamingLLM's (and kvpress's) 4 sinks, which also
# covers the role header (3 tokens) and the end of turn (2) of the default model's template whole.
# A choice, not a value taken from the protected-boundaries paper (arXiv 2605.18053).
DEFAULT_PROTECT = 4


class UsageError(ValueError):
    """Bad input: printed as one line, exit code 2. Raised where the input is checked, never for bugs."""


# ----------------------------------------------------------------------------- what a plan holds

@dataclass
class Design:
    """What a script runs, from its own flags: prompts, remedies, the user turns of each job, and its scoring."""
    prompts: list[P.Prompt]
    remedies: list[Remedy]
    turns: list[tuple[str, str | None]]          # (name, user text); None = the prompt's own task
    score: Callable                              # (job, turn, response) -> the fields the script measures
    fingerprint: dict = field(default_factory=dict)   # extra entries for run.json (e.g. the attacks' texts)
    system_message: Callable = P.build_system_message   # (prompt, defense) -> P.SystemMessage: the turn compressed
    layout: Callable | None = None               # (job, system encoding) -> (token spans by name, whitelisted
                                                 # positions, partitions); None: experiment.prompt_layout
    answer_prefix: Callable | None = None        # (prompt) -> text that starts the answer, after the generation
                                                 # prompt (RULER's, with --answer-prefix); None: none


@dataclass
class Plan:
    """A run, checked: what to run (settings x ratios x prompts), with what, where, and what run.json records."""
    settings: list[Setting]
    ratios: list[float]
    defense: P.Defense | None
    design: Design
    model: str                                   # a checkpoint folder
    device: str                                  # "cpu", "cuda" or "cuda:N"
    dtype: str                                   # a key of model.DTYPES
    batch_size: int
    max_new_tokens: int
    out: str                                     # the output folder
    run_settings: dict                           # what run.json records


# ----------------------------------------------------------------------------- command line

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one line, like every other bad input."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def parse_args(script, argv=None) -> argparse.Namespace:
    """The flags, with the defaults of the chosen --preset (flags given explicitly win).

    `script` (experiment.Experiment) gives the description, defaults, presets and its own flags."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="demo")
    preset = first.parse_known_args(argv)[0].preset
    if preset not in script.presets:
        raise UsageError(f"unknown --preset {preset!r}: choose from {', '.join(script.presets)}")
    defaults = {**script.defaults, **script.presets[preset]}
    parser = ArgumentParser(description=script.description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(script.presets), default="demo",
                        help="flag defaults: demo = a few minutes on a 2-core CPU, full = the bigger sweep; flags "
                             "given explicitly win (default %(default)s)")
    compression_arguments(parser, defaults)
    common_arguments(parser, defaults)
    decode_arguments(parser)
    run_arguments(parser, defaults)
    script.add_arguments(parser)
    parser.set_defaults(**defaults)         # a preset may set any flag, the script's own too (e.g. --data, --length)
    return parser.parse_args(argv)


def compression_arguments(parser: argparse.ArgumentParser, defaults: dict):
    """What is evicted: policies, allocations, their options, ratios."""
    a = parser.add_argument
    a("--policy", default=defaults["policy"],
      help=f"eviction policy, or a comma list to run several (choices: {', '.join(POLICIES)}; default %(default)s)")
    a("--allocation", default="uniform",
      help="how the budget is spread over layers and KV heads, or a comma list to compare several: uniform = "
           "max(1, int(L(1-r))) in every layer and KV head (the paper's); pyramid = more in early layers, fewer "
           "in late ones (PyramidKV, Cai et al. 2024, arXiv 2406.02069; kvpress 0.5.5's budgets); adakv = per "
           "layer, KV heads share the budget by score, each keeping at least 20%% of its share (alpha; AdaKV, Feng "
           "et al. 2024, arXiv 2407.11550; kvpress 0.5.5's AdaKVPress). Settings: --allocation-option. Default "
           "%(default)s")
    a("--policy-option", action="append", default=[], metavar="NAME=VALUE",
      help="a keyword setting of the chosen policies' score functions, e.g. window=32 (SnapKV) or seed=1 "
           "(random); repeatable; applies to every chosen policy that takes it")
    a("--allocation-option", action="append", default=[], metavar="NAME=VALUE",
      help="a keyword setting of the chosen allocations, e.g. alpha=0.1 (adakv's safeguard share) or window=32, "
           "beta=10 (pyramid); repeatable; applies to every chosen allocation that takes it")
    a("--ratios", default=defaults["ratios"],
      help="fractions of the system turn to evict, 0 <= r < 1: a comma list (0,0.5) or start:stop:step "
           "(0:0.9:0.1, stop included); default %(default)s")


def common_arguments(parser: argparse.ArgumentParser, defaults: dict):
    """The prompts, the defense, the remedies and the compression mode."""
    a = parser.add_argument
    a("--defense", default=defaults["defense"],
      help=f"defense around the directive: {', '.join(P.DEFENSE_CHOICES)}, or paper:NAME for one of the paper's "
           "(e.g. paper:standard_defense, read from --defense-file or downloaded; default %(default)s)")
    a("--defense-file", help="the paper's defense_template.json, for --defense paper:NAME (default: the paper's own, "
                             "downloaded once and checksum-verified)")
    a("--whitelist", action="append", default=None, metavar="PHRASE",
      help="a phrase of the system message whose tokens are never evicted (repeatable); 'defense' = the "
           "defense's own must-keep phrase; 'facts' = the facts of RULER prompts (the needles' sentences)")
    a("--fair", choices=["none", "defense", "instructions", "facts"], default="none",
      help="fair eviction: equal keep rate for defense and directive ('defense'), for every instruction "
           "and the defense ('instructions', built-in prompts only), or for every fact and every stretch of "
           "haystack between them ('facts', RULER prompts only); default %(default)s")
    a("--debias", type=float, default=1.0,
      help="with --fair: 0 = the plain policy, 1 = fully fair, in between = budgets interpolated (default 1)")
    a("--protect", type=int, metavar="N",
      help="protected boundaries: never evict the first and last N tokens of every part of the system turn (the "
           "template's role header and end, each defense side, the preamble, each instruction), within the same "
           "budget, like a whitelist built from spans. evaluate.py: applies to every policy (default off); "
           "leak.py: N of the 'protect' remedy (default %d)" % DEFAULT_PROTECT)
    a("--query-aware", nargs="?", const="on", default="off", choices=["off", "on", "both"],
      help="compress the system turn together with the user turn that follows it (the question in context, as "
           "kvpress's benchmarks do) instead of the system turn alone before the question is known: the policy "
           "scores the system turn with the queries of both, the budget is the system turn's, and the user turn "
           "is kept whole. One compression per user turn (leak.py: per attack). 'both' runs every setting in "
           "both modes, to compare them; no fair eviction. Default %(default)s; the bare flag means on")
    a("--data", help="a sys_ifeval-style JSONL file, or 'paper' for the paper's own file (downloaded once from its "
                     "repository and checksum-verified; see paperdata.py); evaluate.py also takes ruler:TASK[,TASK...] "
                     "(RULER's synthetic retrieval tasks, generated locally: ruler.py; ruler:all for the 11, "
                     "niah_single and niah_multikey for their first variants); default: the built-in "
                     "prompt set")
    a("--limit", type=int, default=defaults["limit"],
      help="use the first N prompts (RULER: N prompts per task) (default %(default)s; 0 = all)")
    a("--max-new-tokens", type=int, default=defaults["max_new_tokens"], help="answer length cap (default %(default)s)")


def decode_arguments(parser: argparse.ArgumentParser):
    """Compression during decoding (decoding.Decoding): off unless --decode-target is given."""
    a = parser.add_argument
    a("--decode-target", metavar="N[,N...]",
      help="also compress while the answer grows: every --decode-interval decode steps, cut each layer's whole "
           "cache (system turn, user turn, answer so far) to N entries per KV head with the same policy, "
           "allocation and remedies; a comma list runs each target as its own setting. --max-new-tokens must "
           "exceed the interval for any cut to happen. Off by default")
    a("--decode-interval", type=int, default=None, metavar="K",
      help="decode steps between two cuts (with --decode-target; default 16)")
    a("--decode-buffer", type=int, default=None, metavar="B",
      help="queries of the last B decode tokens that the policy reads at a cut (with --decode-target; default 16)")
    a("--rerotate", action="store_true",
      help="with --decode-target: after each cut, re-rotate the kept keys to positions 0..n-1 and continue at n "
           "(default: original positions)")


def run_arguments(parser: argparse.ArgumentParser, defaults: dict):
    """Where and how the run computes."""
    a = parser.add_argument
    a("--model", default=DEFAULT_MODEL, help="a Hugging Face checkpoint folder (default: the bundled SmolLM2-135M)")
    a("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    a("--dtype", default=defaults["dtype"], choices=list(DTYPES),
      help="weights and cache dtype (default %(default)s). float32 answers do not depend on --batch-size; "
           "bfloat16 kernels round differently for different batch shapes, so its answers can")
    a("--batch-size", type=int, default=defaults["batch_size"],
      help="prompts per forward; a batch holds one setting and ratio (default %(default)s)")
    a("--seed", type=int, default=0, help="seed of the built-in prompt set, or of the RULER prompts (default 0)")
    a("--out", default=defaults["out"], help="output folder (default %(default)s)")


# ----------------------------------------------------------------------------- one flag at a time

MAX_RATIOS = 1000         # a grid of more ratios is a typo (a step of 1e-9), not a sweep anyone can run


def parse_ratios(text: str) -> list[float]:
    """--ratios: a comma list or start:stop:step (stop included), as sorted distinct numbers in [0, 1)."""
    if not text.strip(" ,"):
        raise UsageError(f"--ratios {text!r} is empty: give fractions to evict, e.g. 0,0.5 or 0:0.9:0.1")
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not all(map(math.isfinite, (start, stop, step))):
                raise UsageError(f"--ratios {text!r}: start, stop and step must be finite numbers")
            if step <= 0:
                raise UsageError(f"--ratios {text!r}: the step must be positive")
            if stop < start:
                raise UsageError(f"--ratios {text!r} is empty: stop is below start")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1     # counted before any list is built
            if count > MAX_RATIOS:
                raise UsageError(f"--ratios {text!r} makes {count:,} ratios, more than {MAX_RATIOS:,}: "
                                 "raise the step")
            values = [round(start + i * step, 6) for i in range(count)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"--ratios {text!r} is not a comma list of numbers or start:stop:step") from None
    bad = [r for r in values if not 0 <= r < 1]
    if bad:
        raise UsageError(f"--ratios: {bad[0]} is outside [0, 1); a ratio is the fraction evicted")
    values = sorted({value + 0.0 for value in values})              # + 0.0: -0 is 0, in labels and keys too
    if len(values) > MAX_RATIOS:
        raise UsageError(f"--ratios lists {len(values):,} ratios, more than {MAX_RATIOS:,}")
    return values


def comma_list(text: str) -> list[str]:
    """A comma list's items: stripped, without empty or repeated ones ("tova,,tova " -> ["tova"])."""
    return list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))


def parse_choices(text: str, choices, what: str) -> list[str]:
    """A comma list of names, each one of `choices`; an unknown name is a UsageError listing them."""
    names = comma_list(text)
    for name in names:
        if name not in choices:
            raise UsageError(f"unknown {what} {name!r}: choose from {', '.join(choices)}")
    if not names:
        raise UsageError(f"no {what} given: choose from {', '.join(choices)}")
    return names


def parse_policies(text: str) -> list[str]:
    return parse_choices(text, POLICIES, "policy")


def policy_settings(policy: str) -> dict:
    """A policy's keyword settings and their defaults."""
    return option_defaults(POLICIES[policy])


def allocation_settings(allocation: str) -> dict:
    """An allocation's keyword settings and their defaults."""
    return option_defaults(ALLOCATIONS[allocation])


def parse_option_value(text: str, default):
    """An option's value, read as the type of the setting's default (bool, int, float or str)."""
    kind = type(default)
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    try:
        value = words[text.lower()] if kind is bool else kind(text) if kind in (int, float) else text
    except (KeyError, ValueError):
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise ValueError(f"expected {'true or false' if kind is bool else article + ' ' + kind.__name__}, "
                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value + 0.0 if kind is float else value                       # -0 is 0 (a label shows the value)


def parse_options(flag: str, items: list[str], chosen: list[str], settings: Callable, what: str,
                  example: str) -> dict[str, dict]:
    """`flag` NAME=VALUE (repeatable) -> {name: {option: value}} for each chosen name whose `settings(name)`
    take the option; an option no chosen name takes, or a value of the wrong type, is a UsageError."""
    options = {name: {} for name in chosen}
    for item in items:
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise UsageError(f"{flag} {item!r}: write NAME=VALUE, e.g. {flag} {example}")
        takers = [name for name in chosen if key in settings(name)]
        if not takers:
            offered = "; ".join(f"{name}: {', '.join(settings(name)) or 'none'}" for name in chosen)
            raise UsageError(f"{flag} {key!r}: no chosen {what} takes it (they take {offered})")
        for name in takers:
            try:
                options[name][key] = parse_option_value(text.strip(), settings(name)[key])
            except ValueError as e:
                raise UsageError(f"{flag} {item!r}: {name}'s {key}: {e}") from None
    return options


def parse_policy_options(items: list[str], policies: list[str]) -> dict[str, dict]:
    """--policy-option NAME=VALUE (repeatable) -> {policy: {name: value}} for each chosen policy taking NAME.

    Each policy's options are tried once on a small random input, so a value the policy cannot
    work with (an even SnapKV kernel, a zero H2O block) is refused before anything runs.
    """
    options = parse_options("--policy-option", items, policies, policy_settings, "policy", "window=32")
    for policy, chosen in options.items():
        if chosen:
            try_policy_options(policy, chosen)
    return options


def parse_allocation_options(items: list[str], allocations: list[str]) -> dict[str, dict]:
    """--allocation-option NAME=VALUE (repeatable) -> {allocation: {name: value}}, like --policy-option."""
    options = parse_options("--allocation-option", items, allocations, allocation_settings, "allocation",
                            "alpha=0.1")
    for allocation, chosen in options.items():
        if chosen:
            try_allocation_options(allocation, chosen)
    return options


def try_policy_options(policy: str, options: dict):
    """Score a small random system turn with these options; an error or a wrong shape is a UsageError."""
    L, heads, kv_heads, dim = 48, 4, 2, 8
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, heads, L, dim, generator=generator)          # (1, H, L, D)
    keys = torch.randn(1, kv_heads, L, dim, generator=generator)          # (1, H_kv, L, D)
    label = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    try:
        rope = 1.0 / 10000 ** (torch.arange(0, dim, 2) / dim)                   # (D/2,) RoPE frequencies
        observed = torch.rand(1, kv_heads, L, generator=generator)              # an observer's record (H2O, KVzip)
        ok = True
        for spans in ([(0, L)], [(0, L // 2), (L // 2, L)]):                    # the plain policy, and fair eviction
            scores = POLICIES[policy](queries, keys, keys, spans, Context(0, 1, observed, rope), **options)
            ok &= tuple(scores.shape) == (1, kv_heads, L) and not bool(scores.isnan().any())
    except (ValueError, RuntimeError, TypeError, IndexError, ZeroDivisionError) as e:
        raise UsageError(f"--policy-option {label}: {policy} fails with it ({type(e).__name__}: {e})") from None
    if not ok:
        raise UsageError(f"--policy-option {label}: {policy} gives no valid scores with it")


def try_allocation_options(allocation: str, options: dict):
    """Spread a budget over a small random model's layers with these options; an error, a wrong shape or a
    negative count is a UsageError."""
    n_layers, kv_heads, L, budget = 4, 2, 48, 24.0
    generator = torch.Generator().manual_seed(0)
    scores = [torch.randn(kv_heads, L, generator=generator) for _ in range(n_layers)]   # (H_kv, L) per layer
    plain = [lambda s=s: (s, None) for s in scores]                 # lazy (scores, tiers), as evict_row gives them
    held = torch.full((n_layers, kv_heads), L)                      # (n_layers, H_kv) evictable entries
    label = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    try:
        counts = ALLOCATIONS[allocation](plain, held, budget, 0.5, **options)
        ok = tuple(counts.shape) == (n_layers, kv_heads) and bool((counts >= 0).all())
    except (ValueError, RuntimeError, TypeError, IndexError, ZeroDivisionError) as e:
        raise UsageError(f"--allocation-option {label}: {allocation} fails with it ({type(e).__name__}: {e})") from None
    if not ok:
        raise UsageError(f"--allocation-option {label}: {allocation} gives no valid counts with it")


def parse_decode(args, compressions: list[Compression]) -> tuple[list[int | None], int | None, int | None]:
    """The decode targets (or [None]: decoding off), the interval and the buffer (defaults 16 with a target,
    None without), each target tried with each of the run's compressions. Raises UsageError."""
    if args.decode_target is None:
        for flag, value in (("--decode-interval", args.decode_interval), ("--decode-buffer", args.decode_buffer),
                            ("--rerotate", args.rerotate or None)):
            if value is not None:
                raise UsageError(f"{flag} needs --decode-target N: decoding compression is off without it")
        return [None], None, None
    targets = []
    for text in args.decode_target.split(","):
        try:
            targets.append(int(text))
        except ValueError:
            raise UsageError(f"--decode-target {args.decode_target!r}: give whole numbers of entries per KV head, "
                             f"e.g. 64 or 64,128") from None
    interval = 16 if args.decode_interval is None else args.decode_interval
    buffer = 16 if args.decode_buffer is None else args.decode_buffer
    for compression in compressions:
        for target in targets:
            try:
                Decoding(compression, target, interval, buffer)
            except ValueError as e:
                raise UsageError(f"--decode-target with --policy {compression.policy}: {e}") from None
    if args.max_new_tokens <= interval:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} does not exceed --decode-interval "
                         f"{interval}: no decode cut would happen; raise --max-new-tokens")
    return list(dict.fromkeys(targets)), interval, buffer


def load_prompts(args, paper_data: str) -> list[P.Prompt]:
    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: must be >= 0 (0 = all prompts)")
    if args.data:
        path = paper_file(paper_data, "--data paper") if args.data == "paper" else args.data
        if os.path.isdir(path):
            raise UsageError(f"--data {args.data!r} is a folder, not a file: pass a JSONL file")
        if not os.path.isfile(path):
            raise UsageError(f"--data {args.data!r} does not exist")
        try:
            prompts = P.load_sys_ifeval(path)
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--data {args.data!r}: {e}") from None
    else:
        prompts = P.builtin_prompts(seed=args.seed)
    return prompts[:args.limit] if args.limit else prompts


def paper_file(name: str, flag: str) -> str:
    """A file of the paper's data (paperdata.py: cached, downloaded once, checksum-verified)."""
    try:
        return paperdata.paper_file(name)
    except paperdata.PaperDataError as e:
        raise UsageError(f"{flag}: {e}") from None


def load_defense(args) -> P.Defense | None:
    defense_file = args.defense_file
    if defense_file is not None and not args.defense.startswith("paper:"):
        raise UsageError(f"--defense-file is read for --defense paper:NAME only, not --defense {args.defense}: drop it")
    if defense_file is None and args.defense.startswith("paper:"):
        defense_file = paper_file("defense_template.json", f"--defense {args.defense}")
    try:
        return P.resolve_defense(args.defense, defense_file)
    except (ValueError, OSError, KeyError, UnicodeDecodeError) as e:
        raise UsageError(f"--defense {args.defense!r}: {e}") from None


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(folder: str) -> str:
    """Identify the checkpoint by its config and file sizes (cheap; weights are not hashed)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--model {folder!r} is a file, not a folder: pass the Hugging Face checkpoint folder "
                         "that holds config.json")
    if not os.path.isdir(folder):
        raise UsageError(f"--model {folder!r} does not exist: run `make weights` (python weights/prepare.py) "
                         "or pass a Hugging Face checkpoint folder")
    files = sorted((n, os.path.getsize(os.path.join(folder, n))) for n in os.listdir(folder)
                   if n.endswith((".json", ".safetensors", ".model")))
    config = os.path.join(folder, "config.json")
    return fingerprint(files + [open(config, errors="replace").read() if os.path.isfile(config) else None])


# ----------------------------------------------------------------------------- the plan

def check_numbers(args):
    """The flags that are plain numbers or names: ranges and choices."""
    if not 0 <= args.debias <= 1:
        raise UsageError(f"--debias {args.debias} is outside [0, 1]")
    args.debias += 0.0                                                   # -0 is 0 (the remedy's label shows it)
    if args.protect is not None and args.protect < 0:
        raise UsageError(f"--protect {args.protect}: must be >= 0 (tokens kept at each end of every part; 0 = off)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise UsageError(f"--device {args.device!r}: choose cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    if args.device.startswith("cuda:") and int(args.device[5:]) >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_text(args):
    """Strings given on the command line: UTF-8 text (Python turns bytes that are not into lone surrogates,
    which no file can hold), and no empty --whitelist phrase."""
    for name, value in sorted(vars(args).items()):
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not is_utf8(text):
                at = next(i for i, c in enumerate(text) if not is_utf8(c))
                raise UsageError(f"--{name.replace('_', '-')} {text!r}: character {at} is not UTF-8 text (bytes "
                                 "that are not UTF-8, or a lone surrogate); rename or re-encode it")
    for phrase in args.whitelist or []:
        if not phrase.strip():
            raise UsageError(f"--whitelist {phrase!r} is empty: give a phrase of the system message, or 'defense'")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def plan_run(script, args) -> Plan:
    """Validate every flag and load the prompts; reads files, loads no model, writes nothing.

    `script` (experiment.Experiment) builds its Design from its own flags (`script.design(args, prompts)`)."""
    check_text(args)
    policies = parse_policies(args.policy)
    options = parse_policy_options(args.policy_option, policies)
    allocations = parse_choices(args.allocation, ALLOCATIONS, "allocation")
    allocation_options = parse_allocation_options(args.allocation_option, allocations)
    ratios = parse_ratios(args.ratios)
    check_numbers(args)
    defense = load_defense(args)
    prompts = script.load_prompts(args, script.paper_data)
    if not prompts:
        raise UsageError("no prompts to run")
    if args.fair == "instructions" and not all(i.text for p in prompts for i in p.instructions):
        raise UsageError("--fair instructions needs each instruction's text, which only the built-in prompts have "
                         "(the paper's data gives one directive text): use --fair defense")
    targets, interval, buffer = parse_decode(args, [
        Compression(p, options=options[p], allocation=a, allocation_options=allocation_options[a])
        for p in policies for a in allocations])
    design = script.design(args, prompts)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.query_aware]
    if True in modes and any(remedy.fair != "none" for remedy in design.remedies):
        raise UsageError("--query-aware cannot take fair eviction, which scores each partition on its own, without "
                         "the user turn: drop --fair (evaluate.py) or 'fair' and 'both' from --remedy (leak.py)")
    if True in modes and REPLAYS & set(policies):
        raise UsageError(f"--query-aware with {', '.join(sorted(REPLAYS & set(policies)))}: its replay of the system "
                         "turn with a user turn after it is not defined yet; run it without --query-aware")
    settings = [Setting(policy, options[policy], remedy, allocation, allocation_options[allocation], query_aware,
                        target, interval, buffer, args.rerotate)                  # decoding off: None, None, None, False
                for query_aware in modes for policy in policies for allocation in allocations
                for target in targets for remedy in design.remedies]
    return Plan(settings, ratios, defense, design, args.model, args.device, args.dtype, args.batch_size,
                args.max_new_tokens, args.out, run_settings(args, options, allocation_options, interval, buffer, design))


def run_settings(args, options: dict, allocation_options: dict, interval: int | None, buffer: int | None,
                 design: Design) -> dict:
    """What run.json records: the flags' effective values, so that how they were given (--preset, option
    spelling) does not matter. The flags added later are left out at their defaults (the decode flags
    whenever decoding is off, --allocation-option when not given), so a folder written before them resumes."""
    decode_flags = ("decode_target", "decode_interval", "decode_buffer", "rerotate")
    recorded = {k: v for k, v in vars(args).items() if k not in ("out", "preset", "policy_option", "allocation_option")
                and (k, v) not in (("protect", None), ("query_aware", "off"), ("length", None))
                and (args.decode_target is not None or k not in decode_flags)}
    if args.decode_target is not None:
        recorded.update(decode_interval=interval, decode_buffer=buffer)
    if any(allocation_options.values()):
        recorded["allocation_options"] = {a: o for a, o in allocation_options.items() if o}
    recorded.update(policy_options={p: o for p, o in options.items() if o},
                    prompts=P.prompts_fingerprint(design.prompts), model_files=model_fingerprint(args.model),
                    **design.fingerprint)
    return normal_settings(recorded)


COMMA_LISTS = ("policy", "allocation", "remedy", "decode_target")     # flags that are comma lists of names or numbers


def normal_settings(settings: dict) -> dict:
    """run.json's settings in the one form they are compared in: --ratios as the list of its numbers (0.5, 0.50
    and .5 alike; a grid as its values), comma lists without empty or repeated items ("tova,," is "tova").
    Applied to what a folder holds too, so a folder written before (ratios as typed) still resumes; what
    cannot be read so is left as it is (it differs, and the folder is refused for it)."""
    settings = dict(settings)
    ratios = settings.get("ratios")
    try:
        if isinstance(ratios, str):
            settings["ratios"] = parse_ratios(ratios)
        elif isinstance(ratios, list):
            settings["ratios"] = sorted({float(r) + 0.0 for r in ratios})
    except (UsageError, TypeError, ValueError):
        pass
    for name in COMMA_LISTS:
        if isinstance(settings.get(name), str):
            settings[name] = ",".join(comma_list(settings[name]))
    return settings
