"""Tokenizers and chat templates for Hugging Face checkpoint folders, without transformers.

`load_tokenizer(folder)` reads either
- `tokenizer.json` holding a byte-level BPE (Llama-3, Qwen2, SmolLM2): encoded with tiktoken, the
  pre-tokenizer regex derived from the file's `pre_tokenizer`, ids identical to HF `tokenizers`; or
- `tokenizer.model`, a sentencepiece model (Llama-2, Mistral), used when tokenizer.json is absent or
  is not byte-level (sentencepiece-style tokenizer.json files use Metaspace, which tiktoken cannot do).
`tokenizer_config.json` (or `chat_template.jinja`) gives bos/eos and the Jinja chat template, which is
rendered the way `transformers.apply_chat_template` renders it.

Security: user text never turns into special tokens. `encode` ignores special-token strings, and
`encode_chat` recognises them only in the text the template itself wrote, never inside message contents.
A chat template comes with the checkpoint, so it runs in Jinja's sandbox with a bound on its work (loop
iterations, calls, time and the size of what it builds; see "chat templates" below); one over the bound is refused.
Text holding a lone surrogate (a str UTF-8 cannot encode, e.g. from JSON's "\\ud800") is refused in one line.
"""
import contextvars
import ctypes
import functools
import itertools
import json
import re
import threading
import time
import types
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

# The GPT-2 pre-tokenizer regex, used by ByteLevel(use_regex=true).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CONTENT_MARK = "\ue000{}\ue001"  # private-use characters: stand-ins for message contents while rendering
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, e.g. from JSON's "\ud800": not text, UTF-8 cannot encode it


def _refuse_lone_surrogate(text: str, what: str):
    if found := LONE_SURROGATE.search(text):
        raise ValueError(f"{what} holds a lone surrogate ({ascii(found.group())} at character {found.start()}), "
                         "which is not text (UTF-8 cannot encode it)")


@dataclass
class ChatEncoding:
    ids: list[int]
    text: str                              # the rendered chat
    offsets: list[tuple[int, int]]         # per token, its char range [start, end) in `text`
    content_spans: list[tuple[int, int]]   # per message, the char range of its content in `text`
    content_leads: list[int] = field(default_factory=list)  # per message, leading chars the template trimmed

    def token_span(self, message_index: int, char_start: int, char_end: int) -> tuple[int, int]:
        """Tokens [t0, t1) overlapping chars [char_start, char_end) of a message's content string."""
        start, end = self.content_spans[message_index]
        lead = self.content_leads[message_index] if self.content_leads else 0
        lo, hi = start + char_start - lead, start + char_end - lead
        if not start <= lo < hi <= end:
            raise ValueError(f"chars [{char_start}, {char_end}) are empty or outside the rendered content of "
                             f"message {message_index} (chars [{lead}, {lead + end - start}) of it are in the chat)")
        overlapping = [t for t, (a, b) in enumerate(self.offsets) if a < hi and b > lo]
        return overlapping[0], overlapping[-1] + 1


def _gpt2_byte_alphabet() -> dict[str, int]:
    """The printable character GPT-2's byte-level BPE writes for each byte, inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return {char: b for b, char in chars.items()}


def pretokenizer_regex(pre_tokenizer: dict | None, where: str) -> str:
    """One regex doing what a tokenizer.json `pre_tokenizer` does, for the shapes that map exactly."""
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer and pre_tokenizer["type"] == "Sequence" \
        else [pre_tokenizer]
    shape = [step["type"] if step else None for step in steps]
    unsupported = ValueError(f"{where}: unsupported pre_tokenizer {shape}; nanokv maps ByteLevel, "
                             "[Split(Regex, Isolated), ByteLevel(use_regex=false)] and [Digits, ByteLevel]")
    if not shape or shape[-1] != "ByteLevel" or steps[-1].get("add_prefix_space"):
        raise unsupported
    use_regex = steps[-1].get("use_regex", True)
    if shape == ["ByteLevel"] and use_regex:
        return GPT2_PATTERN
    if shape == ["Split", "ByteLevel"] and not use_regex:
        split = steps[0]
        if "Regex" not in split["pattern"] or split.get("behavior") != "Isolated" or split.get("invert"):
            raise unsupported
        return split["pattern"]["Regex"]
    if shape == ["Digits", "ByteLevel"] and use_regex:
        # Digits first cuts the text at digit runs (or every digit), then GPT-2's regex runs on each piece:
        # digits lose their optional leading space, and whitespace before a digit ends a piece.
        digits = r"\p{N}" if steps[0].get("individual_digits") else r"\p{N}+"
        return GPT2_PATTERN.replace(r" ?\p{N}+", digits).replace(r"\s+(?!\S)", r"\s+(?=\p{N})|\s+(?!\S)")
    raise unsupported


def _normalizer(spec: dict | None, where: str):
    if spec is None or (spec["type"] == "Sequence" and not spec.get("normalizers")):
        return lambda text: text
    if spec["type"] == "NFC":
        return lambda text: unicodedata.normalize("NFC", text)
    raise ValueError(f"{where}: unsupported normalizer {spec['type']!r} (nanokv handles none or NFC)")


def _is_byte_level(tokenizer_json: dict) -> bool:
    return '"ByteLevel"' in json.dumps(tokenizer_json.get("pre_tokenizer"))


class _TiktokenBPE:
    """Byte-level BPE from a tokenizer.json, through tiktoken: rank = token id, which is merge order."""

    def __init__(self, data: dict, path: Path, special_tokens: dict[str, int]):
        import tiktoken
        model, where = data["model"], str(path)
        if model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError(f"{where}: model is not a plain byte-level BPE")
        byte_of_char, special_ids, vocab = _gpt2_byte_alphabet(), set(special_tokens.values()), model["vocab"]
        try:
            ranks = {bytes(byte_of_char[c] for c in token): i for token, i in vocab.items() if i not in special_ids}
        except KeyError as err:
            raise ValueError(f"{where}: vocab holds {err}, outside the GPT-2 byte alphabet") from None
        # tiktoken needs every single byte; bytes the vocab lacks (SmolLM2 has no token for some control
        # bytes) get stand-in ranks past the vocabulary, dropped after encoding as HF drops them.
        self.vocab_size = max([*ranks.values(), *special_ids]) + 1
        for n, byte in enumerate(b for b in range(256) if bytes([b]) not in ranks):
            ranks[bytes([byte])] = self.vocab_size + n
        # tiktoken merges the adjacent pair with the lowest rank; HF the pair with the earliest merge.
        # Both agree when ids grow with merge order (true of tokenizers-trained and tiktoken-made vocabs).
        previous = -1
        for merge in model["merges"]:
            pair = merge.split(" ", 1) if isinstance(merge, str) else merge
            if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(part, str) for part in pair):
                raise ValueError(f"{where}: merge {merge!r} is not two tokens (\"a b\" or [\"a\", \"b\"])")
            left, right = pair
            rank = vocab.get(left + right, -1)
            if rank <= previous:
                raise ValueError(f"{where}: merge {left!r} + {right!r} makes no token or breaks merge order of "
                                 "ids; tiktoken needs rank = id")
            previous = rank
        self.normalize = _normalizer(data.get("normalizer"), where)
        pattern = pretokenizer_regex(data.get("pre_tokenizer"), where)
        try:
            self.encoding = tiktoken.Encoding(f"nanokv:{path.parent.name}", pat_str=pattern,
                                              mergeable_ranks=ranks, special_tokens=special_tokens)
        except ValueError as err:
            raise ValueError(f"{where}: tiktoken rejects the pre-tokenizer regex: {err}") from None

    def encode(self, text: str, at_start: bool = True, glued: bool = False) -> list[int]:
        ids = self.encoding.encode_ordinary(self.normalize(text))
        return ids if self.encoding.max_token_value < self.vocab_size else [i for i in ids if i < self.vocab_size]

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        return [self.encoding.decode_single_token_bytes(i) for i in ids]

    def decode(self, ids: list[int], at_start: bool = True) -> str:
        return self.encoding.decode_bytes(ids).decode("utf-8", errors="replace")


class _SentencePiece:
    """A sentencepiece tokenizer.model. Text at the start gets sentencepiece's dummy-prefix space; text
    after a special token gets it too in HF's "legacy" mode (Llama-2), not otherwise (Mistral v0.3);
    `glued` text (the rest of a cut word) never does."""

    def __init__(self, path: Path, legacy: bool):
        import sentencepiece
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{path} is not a valid sentencepiece model ({err}); re-download it") from None
        # Appending a normalizer_spec {add_dummy_prefix: false} to the model proto overrides that one field.
        self.plain = sentencepiece.SentencePieceProcessor(
            model_proto=self.sp.serialized_model_proto() + b"\x1a\x02\x18\x00")
        self.legacy = legacy
        self.vocab_size = self.sp.get_piece_size()
        self.special_tokens = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                               if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def encode(self, text: str, at_start: bool = True, glued: bool = False) -> list[int]:
        return (self.sp if (at_start or self.legacy) and not glued else self.plain).encode(text)

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        pieces = [self.sp.id_to_piece(i) for i in ids]
        return [bytes([int(p[3:5], 16)]) if self.sp.is_byte(i) else p.replace("\u2581", " ").encode()
                for i, p in zip(ids, pieces)]

    def decode(self, ids: list[int], at_start: bool = True) -> str:
        return (self.sp if at_start or self.legacy else self.plain).decode(ids)


def _char_offsets(text: str, token_bytes: list[bytes], start: int) -> list[tuple[int, int]]:
    """Char range in `text` (shifted by `start`) of each token; a token cutting a multibyte character
    gets that whole character. Tokens that do not spell `text` exactly (normalisation) all get all of it."""
    data, joined = text.encode(), b"".join(token_bytes)
    lead = len(joined) - len(data)  # 1 when sentencepiece added its dummy-prefix space
    if lead not in (0, 1) or joined[lead:] != data or joined[:lead] not in (b"", b" "):
        return [(start, start + len(text))] * len(token_bytes)
    char_of_byte = [i for i, char in enumerate(text) for _ in char.encode()] + [len(text)]
    offsets, position = [], -lead
    for piece in token_bytes:
        first, last = max(position, 0), max(position + len(piece), 0)
        end = char_of_byte[last - 1] + 1 if last > first else char_of_byte[first]
        offsets.append((start + char_of_byte[first], start + end))
        position += len(piece)
    return offsets


def _token_text(value) -> str | None:
    """A special token in tokenizer_config.json: a string, or a dict with "content"."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
        if re.search(r"\\u[dD][89a-fA-F]", text):  # surrogate escapes: a pair is one character, a lone one no text
            json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{path} holds a lone surrogate ({ascii(err.object[err.start:err.end])} in "
                         f"{ascii(err.object[max(err.start - 30, 0):err.end + 30])}), which is not text; "
                         "re-download it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); regenerate or re-download it") from None
    except RecursionError:
        raise ValueError(f"{path} nests deeper than Python's JSON reader allows; regenerate or re-download it") from None
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror}); regenerate or re-download it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; regenerate or re-download it")
    return data


# --- chat templates ------------------------------------------------------------------------------------------
# A chat template comes with a downloaded checkpoint: it is untrusted code. Jinja's sandbox keeps it away from
# Python's internals, not from working forever or filling memory (two nested loops over range(99999) never end;
# 'x' * 10**10 asks for 10 GB in one step). So each rendering runs on a budget, and a template that overspends
# it is refused with _TemplateOverBudget:
# - steps: every loop iteration and every call (macro, function, method) is a step, MAX_TEMPLATE_STEPS in all.
#   Loops are metered by a rewrite of the parsed template (each loop body starts by taking a step), calls by the
#   sandbox's `call`, which every call in a sandboxed template goes through.
# - time: MAX_TEMPLATE_SECONDS. Each step and each filter checks the clock, and a watchdog (_Watchdog) stops the
#   rendering at its deadline inside one long call or filter too (wordwrap on megabytes of text, say). Across
#   renderings a template may spend SLOW_TEMPLATE_SECONDS in all, then at most SLOW_TEMPLATE_MEAN per rendering
#   on average: a run renders each prompt a few times, so 2 s per rendering would add up to minutes.
# - size: no string, list or tuple may hold more than MAX_TEMPLATE_CHARS items, nor the output; no integer more
#   than MAX_TEMPLATE_INT_BITS bits; and all values built and all text written (to the output, or into a macro's
#   result or a {% set %} block) together at most MAX_TEMPLATE_BUILT items. Whatever can
#   blow a value up in one go is checked before it runs: `*` and `**`; a size argument (center, indent, batch,
#   slice, str.ljust...); every width and precision of a format (`%`, |format, str.format; a '*' width taken from
#   the values, a '{:{}}' width made by another field) and the text it would make; tojson's indent and
#   separators, written once per item and level; what indent and wordwrap insert on every line; `replace`; `join`;
#   strftime_now's format; a string cut into pieces by a filter or method (list, sort, split...: an object per
#   character or word), at most MAX_TEMPLATE_CUT characters long; and turning a value into text (output, `~`, `%`,
#   filters), measured on the value's text form. What remains (`+`, results of calls and filters) is checked and
#   counted after it is built, which then is at most a few times the size of checked operands.
# A real template takes a few steps per message and builds little more than the chat. These bounds do not cover
# every path a hostile template could find through Jinja's filters; run checkpoints you do not trust under OS
# limits too.
MAX_TEMPLATE_STEPS = 100_000
MAX_TEMPLATE_SECONDS = 5.0
SLOW_TEMPLATE_SECONDS, SLOW_TEMPLATE_MEAN = 2.0, 0.05       # a real template: about a millisecond a rendering
MAX_TEMPLATE_CHARS = 10_000_000
MAX_TEMPLATE_BUILT = 100_000_000
MAX_TEMPLATE_INT_BITS = 100_000
MAX_STRFTIME_FORMAT = 1000
MAX_TEMPLATE_CUT = MAX_TEMPLATE_CHARS // 4  # the longest string cut into pieces: as long as the longest chat
_SIZE_ARGUMENTS = ("center", "indent", "batch", "slice", "ljust", "rjust", "zfill")  # an int sets the result's size
# Filters that cut a string into pieces (characters, words, lines), an object of up to ~100 bytes each
_CUTTING_FILTERS = ("list", "batch", "slice", "sort", "unique", "map", "select", "reject", "selectattr", "rejectattr",
                    "groupby", "join", "min", "max", "title", "wordcount", "urlize", "wordwrap", "striptags", "indent",
                    "pprint")


class _TemplateOverBudget(Exception):
    """A rendering went over its budget; the message says which limit."""


class _TemplateTimedOut(_TemplateOverBudget):
    """Raised by the watchdog in the rendering's thread (as a class, so it takes no arguments)."""

    def __init__(self):
        super().__init__(f"it runs for more than {MAX_TEMPLATE_SECONDS:g} seconds")


class _TemplateRaised(jinja2.TemplateError):
    """The template's own raise_exception(message), e.g. a template that has no system role."""


class _Budget:
    def __init__(self):
        self.steps_left, self.built_left = MAX_TEMPLATE_STEPS, MAX_TEMPLATE_BUILT
        self.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat template budget")  # one per rendering


def _take_step(value=None):
    """The filter each loop body starts with (and each call takes): one step of the rendering's budget."""
    budget = _budget.get()
    budget.steps_left -= 1
    if budget.steps_left < 0:
        raise _TemplateOverBudget(f"it takes more than {MAX_TEMPLATE_STEPS} loop iterations and calls")
    _check_clock()
    return value


def _check_clock():
    if time.monotonic() > _budget.get().deadline:
        raise _TemplateTimedOut()


def _refuse_size(size: int, what: str):
    if size > MAX_TEMPLATE_CHARS:
        raise _TemplateOverBudget(f"{what} of {size} items (the limit is {MAX_TEMPLATE_CHARS})")


def _text_size(value, limit: int = MAX_TEMPLATE_CHARS) -> int:
    """About len(str(value)), counted only until it passes `limit`: a huge nested value is cheap to measure."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 3 + 1
    if isinstance(value, Namespace):
        value = value._Namespace__attrs  # what its repr shows
    if isinstance(value, dict):
        items = itertools.chain.from_iterable(value.items())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    else:  # floats, None, Undefined, Jinja's loop and macro objects: short texts
        return len(str(value))
    size = 2
    for item in items:
        size += _text_size(item, limit - size) + 2
        if size > limit:
            break
    return size


def _as_text(value, made_by: str):
    if _text_size(value) > MAX_TEMPLATE_CHARS:
        raise _TemplateOverBudget(f"{made_by} got a value of more than {MAX_TEMPLATE_CHARS} characters as text")
    return value


def _built(value, made_by: str):
    """Check and count a value the template just built."""
    if isinstance(value, int) and value.bit_length() > MAX_TEMPLATE_INT_BITS:
        raise _TemplateOverBudget(f"{made_by} made an integer of more than {MAX_TEMPLATE_INT_BITS} bits")
    if isinstance(value, (str, list, tuple, dict)):
        _refuse_size(len(value), f"{made_by} made a value")
        budget = _budget.get()
        budget.built_left -= len(value)
        if budget.built_left < 0:
            raise _TemplateOverBudget(f"it builds more than {MAX_TEMPLATE_BUILT} items in all")
    return value


def _check_width(number: int, part: str, made_by: str):
    """A width or precision of a format: its padding is allocated in one go, so it is checked before it runs."""
    if number > MAX_TEMPLATE_CHARS:
        shown = number if number < 10**18 else "more than 10**18"
        unit = "characters" if part == "width" else "digits"
        raise _TemplateOverBudget(f"{made_by} asks for a {part} of {shown} {unit} in a format string")


def _number_in(digits: str) -> int:
    return int(digits) if len(digits) <= 18 else 10**18  # a longer run only needs to be known as too large


def _formatted_size(value, conversion: str = "s") -> int:
    """At least the length of `value` formatted with no width or precision, by '%' or str.format: a number in any
    notation, with separators; anything else its text, ten times over when written as repr ('\\U0001f600' is ten
    characters for one) or inside a container (whose str shows the reprs of its items)."""
    if isinstance(value, (int, float)):
        return value.bit_length() * 5 // 4 + 500 if isinstance(value, int) else 500  # 1e308 in fixed point: 412
    if conversion in ("r", "a") or not isinstance(value, str):
        return 10 * _text_size(value) + 10
    return _text_size(value)


def _check_spec(spec: str, made_by: str) -> int:
    """Check the widths and precisions of a str.format field's spec (every number in it, as a fill character could
    be a digit too); their sum, at least what they add to the field's text."""
    numbers = [(_number_in(digits), "precision" if dot else "width") for dot, digits in re.findall(r"(\.?)(\d+)", spec)]
    for number, part in numbers:
        _check_width(number, part, made_by)
    return sum(number for number, _ in numbers)


def _printf_key(fmt: str, at: int) -> tuple[str | None, int]:
    """The mapping key of a '%' conversion whose text starts at `at`, as Python reads it (parentheses nest), and
    where the rest of the conversion starts."""
    if not fmt.startswith("(", at):
        return None, at
    depth, start = 0, at
    while at < len(fmt):
        depth += {"(": 1, ")": -1}.get(fmt[at], 0)
        at += 1
        if depth == 0:
            break
    return fmt[start + 1:at - 1], at


def _printf_size(fmt: str, values, made_by: str) -> int:
    """Check the widths and precisions of `fmt % values` before it runs, written in the format or taken from the
    values by '*'; return at least the length of the text it would make. The format is read as Python reads it, up
    to where Python would raise (a missing value or key, a '*' that is not an int): what comes after is never made."""
    positional = iter(values if isinstance(values, tuple) else (values,))
    size, at = len(fmt), 0
    while (at := fmt.find("%", at) + 1) > 0:  # a conversion: %[(key)][flags][width][.precision][hlL]type
        key, at = _printf_key(fmt, at)
        while fmt[at:at + 1] in ("-", "+", " ", "#", "0"):
            at += 1
        for part in ("width", "precision"):
            if part == "precision":
                if not fmt.startswith(".", at):
                    break
                at += 1
            if fmt.startswith("*", at):
                number, at = next(positional, None), at + 1
                if not isinstance(number, int):
                    return size
            else:
                digits = _DIGITS.match(fmt, at).group()
                number, at = _number_in(digits or "0"), at + len(digits)
            _check_width(abs(number), part, made_by)
            size += abs(number)
        at += 1 if fmt[at:at + 1] in ("h", "l", "L") else 0
        conversion, at = fmt[at:at + 1], at + 1
        if conversion == "%":
            continue
        if key is None:
            value = next(positional, _MISSING)
        else:
            value = values[key] if isinstance(values, dict) and key in values else _MISSING
        if value is _MISSING:
            return size
        size += _formatted_size(value, conversion)
    return size


def _check_printf(fmt: str, values, made_by: str):
    _refuse_size(_printf_size(fmt, values, made_by), f"{made_by} would make a text")


_DIGITS, _MISSING = re.compile(r"\d*"), object()


def _check_json(value, indent, separators, made_by: str = "the filter 'tojson'"):
    """Check json.dumps(value, indent=indent, separators=separators) before it runs: the indent is made once
    (' ' * indent), then written before each item once per level of nesting, and a separator after each item, so a
    small value with a large indent or separator makes a huge text. Strings count at their length (escaping makes
    them at most a few times longer)."""
    if isinstance(indent, int) and indent > MAX_TEMPLATE_CHARS:
        raise _TemplateOverBudget(f"{made_by} asks for an indent of {indent} characters (the limit is "
                                  f"{MAX_TEMPLATE_CHARS})")
    indent_size = len(indent) if isinstance(indent, str) else max(indent, 0) if isinstance(indent, int) else 0
    newline = 0 if indent is None else 1
    try:
        item_separator, key_separator = separators or ((", " if indent is None else ","), ": ")
        item_separator, key_separator = _text_size(item_separator), _text_size(key_separator)
    except (TypeError, ValueError):
        return  # json.dumps says what is wrong with them

    def size(item, level: int, limit: int) -> int:  # an upper bound of item's JSON at nesting `level`, until > limit
        if not isinstance(item, (dict, list, tuple)):
            return _text_size(item, limit) + 2
        total = 2 + newline + indent_size * level
        pairs = item.items() if isinstance(item, dict) else ((None, child) for child in item)
        for key, child in pairs:
            total += item_separator + newline + indent_size * (level + 1)
            total += 0 if key is None else _text_size(key) + 2 + key_separator
            total += size(child, level + 1, limit - total)
            if total > limit:
                break
        return total

    _refuse_size(size(value, 0, MAX_TEMPLATE_CHARS), f"{made_by} would make a text")


_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines cuts


def _check_inserted(text, per_line: int, made_by: str):
    """Check a filter that writes `per_line` characters on every line (indent) or at every break (wordwrap)."""
    if isinstance(text, str):
        lines = sum(map(text.count, _LINE_BREAKS)) + 2
        _refuse_size(len(text) + lines * per_line, f"{made_by} would make a text")


def _check_cut(text, made_by: str):
    if isinstance(text, str) and len(text) > MAX_TEMPLATE_CUT:
        raise _TemplateOverBudget(f"{made_by} would cut a text of {len(text)} characters into pieces (the limit is "
                                  f"{MAX_TEMPLATE_CUT}, one object per piece)")


def _check_joined(separator_size: int, items, made_by: str):
    if isinstance(items, (list, tuple)) and _text_size(items) + separator_size * len(items) > MAX_TEMPLATE_CHARS:
        raise _TemplateOverBudget(f"{made_by} would make a text of more than {MAX_TEMPLATE_CHARS} characters")


def _check_replaced(text: str, old: str, new: str, made_by: str):
    _refuse_size(len(text) + (text.count(old) if old else len(text) + 1) * len(new), f"{made_by} would make a text")


def _written(value):
    """Check and count what the template writes: each {{ }} and each piece of its own text, wherever it goes
    (the output, a macro's result, a {% set %} block)."""
    size = _text_size(value)
    if size > MAX_TEMPLATE_CHARS:
        raise _TemplateOverBudget(f"'{{{{ }}}}' got a value of more than {MAX_TEMPLATE_CHARS} characters as text")
    budget = _budget.get()
    budget.built_left -= size
    if budget.built_left < 0:
        raise _TemplateOverBudget(f"it builds more than {MAX_TEMPLATE_BUILT} items in all")
    return value


def _bounded_range(*args):
    if len(r := range(*args)) > MAX_TEMPLATE_STEPS:
        raise _TemplateOverBudget(f"range({', '.join(map(str, args))}) has {len(r)} items, more than the "
                                  f"{MAX_TEMPLATE_STEPS} loop iterations allowed")
    return r


def _bounded_filter(name: str, function):
    @functools.wraps(function)  # keeps Jinja's pass_context / pass_eval_context marks
    def bounded(*args, **kwargs):
        value, *rest = [a for a in args if not isinstance(a, (Context, EvalContext, jinja2.Environment))] or [None]
        made_by = f"the filter {name!r}"
        _check_clock()
        _as_text([value, *rest, *kwargs.values()], made_by)  # all it is handed, measured once
        if name in _SIZE_ARGUMENTS:
            for size in [*rest, *kwargs.values()]:
                if isinstance(size, int):
                    _refuse_size(size, f"{made_by} was asked for a size")
        if name in _CUTTING_FILTERS:
            _check_cut(value, made_by)
        if name == "format":  # value % (kwargs or args)
            _check_printf(str(value), kwargs or tuple(rest), made_by)
        if name == "indent":
            width = kwargs.get("width", rest[0] if rest else 4)
            _check_inserted(value, len(width) if isinstance(width, str) else width if isinstance(width, int) else 0,
                            made_by)
        if name == "wordwrap":  # a break can come after every character
            wrapstring = kwargs.get("wrapstring", rest[2] if len(rest) > 2 else None) or "\n"
            if isinstance(value, str):
                _refuse_size(len(value) + (len(value) + 1) * _text_size(wrapstring), f"{made_by} would make a text")
        if name == "join":
            _check_joined(_text_size(kwargs.get("d", rest[0] if rest else "")), value, "the filter 'join'")
        if name == "replace" and len(rest) >= 2:
            _check_replaced(str(value), str(rest[0]), str(rest[1]), "the filter 'replace'")
        return _built(function(*args, **kwargs), f"the filter {name!r}")
    return bounded


def _check_str_method(text: str, name: str, args: tuple, kwargs: dict):
    """The size a str method's result would have, checked before it runs, for the methods that can blow up."""
    made_by = f"str.{name}"
    if name in _SIZE_ARGUMENTS and args and isinstance(args[0], int):
        _refuse_size(args[0], f"{made_by} was asked for a size")
    if name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        _refuse_size(len(text) + text.count("\t") * max(tabsize, 0), f"{made_by} would make a text")
    if name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        _check_replaced(text, args[0], args[1], made_by)
    if name == "join" and args:
        _check_joined(len(text), args[0], made_by)
        _check_cut(args[0], made_by)
    if name in ("split", "rsplit", "splitlines"):
        _check_cut(text, made_by)
    if name in ("format", "format_map"):  # widths are checked by _BoundedFormatter, field by field
        _as_text([*args, *kwargs.values()], made_by)


class _MeterLoopsAndConcatenation(NodeTransformer):
    """Rewrites a parsed template: every loop body starts with a step; `~` measures its operands' text first
    and checks and counts its result; everything written is checked and counted."""

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        node.nodes = [nodes.Filter(child, "nanokv_written", [], [], None, None, lineno=node.lineno)
                      for child in node.nodes]
        return node

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        step = nodes.Filter(nodes.Const(None), "nanokv_step", [], [], None, None, lineno=node.lineno)
        node.body = [nodes.ExprStmt(step, lineno=node.lineno), *node.body]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        node = self.generic_visit(node)
        node.nodes = [nodes.Filter(operand, "nanokv_as_text", [], [], None, None, lineno=node.lineno)
                      for operand in node.nodes]
        return nodes.Filter(node, "nanokv_built", [], [], None, None, lineno=node.lineno)


class _BoundedFormatting:
    """Jinja's sandboxed str.format, checked field by field before each is formatted: its spec's widths and
    precisions (after nested fields made them: '{0:{1}}'), and the text made so far ('{0}{0}{0}...' repeats a
    value)."""
    made_by = "str.format"

    def vformat(self, format_string, args, kwargs):
        self.made = len(format_string)  # the literal text, at most
        return super().vformat(format_string, args, kwargs)

    def format_field(self, value, format_spec):
        _check_clock()
        size = self.made + _formatted_size(value) + _check_spec(str(format_spec), self.made_by)
        _refuse_size(size, f"{self.made_by} would make a text")
        text = super().format_field(value, format_spec)
        self.made += len(text)
        return text


class _BoundedFormatter(_BoundedFormatting, SandboxedFormatter):
    pass


class _BoundedEscapeFormatter(_BoundedFormatting, SandboxedEscapeFormatter):  # for Markup's format (|e, |safe)
    pass


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with the budget above. Filters are bound when a template is compiled, so a
    template cannot swap the metering filters for its own."""
    intercepted_binops = frozenset({"*", "**", "+", "%"})  # their calls come to call_binop (and never constant-fold)

    def __init__(self, **options):
        super().__init__(**options)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        # pass_context: Jinja never runs these at compile time to fold them into constants
        self.filters["nanokv_step"] = jinja2.pass_context(lambda context, value: _take_step(value))
        self.filters["nanokv_as_text"] = jinja2.pass_context(lambda context, value: _as_text(value, "'~'"))
        self.filters["nanokv_built"] = jinja2.pass_context(lambda context, value: _built(value, "'~'"))
        self.filters["nanokv_written"] = jinja2.pass_context(lambda context, value: _written(value))
        self.globals["range"] = _bounded_range
        del self.globals["lipsum"]  # Lorem ipsum of any length; no chat template has a use for it

    def wrap_str_format(self, value):
        """A str's format or format_map method, run as Jinja's sandbox runs it (SandboxedEnvironment.wrap_str_format)
        but through _BoundedFormatting; None for anything else."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) \
                or value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
            return None
        text, is_format_map = value.__self__, value.__name__ == "format_map"
        formatter = _BoundedEscapeFormatter(self, escape=text.escape) if isinstance(text, Markup) \
            else _BoundedFormatter(self)
        formatter.made_by = f"str.{value.__name__}"

        def bounded(*args, **kwargs):
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument, and no keyword arguments")
                args, kwargs = (), args[0]
            return type(text)(formatter.vformat(text, args, kwargs))

        return functools.update_wrapper(bounded, value)

    def call_binop(self, context, operator, left, right):
        made_by = f"{operator!r}"
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(times, int):
                    _refuse_size(len(sequence) * times, "'*' would make a value")
        if isinstance(left, int) and isinstance(right, int) and operator in ("*", "**"):  # bits of the result, at least
            bits = left.bit_length() + right.bit_length() - 1 if operator == "*" else (left.bit_length() - 1) * right
            if bits > MAX_TEMPLATE_INT_BITS:
                raise _TemplateOverBudget(f"{made_by} would make an integer of more than {MAX_TEMPLATE_INT_BITS} bits")
        if operator == "%" and isinstance(left, str):
            _as_text(right, made_by)
            _check_printf(left, right, made_by)
        return _built(super().call_binop(context, operator, left, right), made_by)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
        _take_step()
        method_of = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # str.format comes wrapped
        if isinstance(method_of, str):
            _check_str_method(method_of, getattr(__obj, "__name__", ""), args, kwargs)
        return _built(super().call(__context, __obj, *args, **kwargs), "a call")


@lru_cache
def _compile_chat_template(source: str) -> jinja2.Template:
    """A Jinja chat template compiled as transformers compiles it, in the bounded sandbox."""
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise _TemplateRaised(_as_text(message, "raise_exception"))

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # HF's: no HTML escaping
        _check_json(x, indent, separators)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):  # Python grows strftime's buffer up to 256 bytes per format character
        if isinstance(fmt, str) and len(fmt) > MAX_STRFTIME_FORMAT:
            raise _TemplateOverBudget(f"strftime_now got a format of {len(fmt)} characters (the limit is "
                                      f"{MAX_STRFTIME_FORMAT})")
        return datetime.now().strftime(fmt)

    env.filters["tojson"] = _bounded_filter("tojson", tojson)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(_MeterLoopsAndConcatenation().visit(env.parse(source)))


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Watchdog:
    """Stops a rendering at its deadline even inside one long filter or call: a timer thread raises
    _TemplateTimedOut in the rendering's thread (CPython's PyThreadState_SetAsyncExc). The exception arrives between
    two bytecodes, so it reaches filters written in Python (wordwrap's textwrap, pprint, groupby...); one C call (a
    sort) runs to its end, which the size bounds keep short."""

    def __init__(self, seconds: float):
        self.thread_id = threading.get_ident()
        self.timer = threading.Timer(seconds, self._send, (_TemplateTimedOut,))
        self.timer.daemon = True

    def _send(self, exception):  # None withdraws an exception sent but not raised yet
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id),
                                                   None if exception is None else ctypes.py_object(exception))

    def __enter__(self):
        self.timer.start()

    def __exit__(self, *error):
        self.timer.cancel()
        self.timer.join()  # the timer has fired or never will
        self._send(None)


def _render_bounded(template: jinja2.Template, variables: dict) -> str:
    """Render within a fresh budget: the output is checked as it streams out, so it never grows past the limit."""
    token = _budget.set(_Budget())
    try:
        with _Watchdog(MAX_TEMPLATE_SECONDS):
            pieces, length = [], 0
            for piece in template.generate(**variables):
                length += len(piece)
                if length > MAX_TEMPLATE_CHARS:
                    raise _TemplateOverBudget(f"its output passes {MAX_TEMPLATE_CHARS} characters")
                pieces.append(piece)
            return "".join(pieces)
    finally:
        _budget.reset(token)


def _fill_in(text: str, literals: list[str], choices: list[list[str]]) -> list[tuple[int, int]] | None:
    """Where `text` is literals[0] + one of choices[0] + literals[1] + ... + literals[-1], the (start, end) of
    each choice, the earlier choices preferred (as a regex alternation would match); None if it is not. Plain
    string comparisons: a regex of long alternatives compiles in quadratic time."""
    failed = set()                                         # (i, position): no way to finish from there

    def finish(i: int, position: int) -> list | None:
        if not text.startswith(literals[i], position) or (i, position) in failed:
            return None
        position += len(literals[i])
        if i == len(choices):
            return [] if position == len(text) else None
        for choice in choices[i]:
            if text.startswith(choice, position) and (rest := finish(i + 1, position + len(choice))) is not None:
                return [(position, position + len(choice)), *rest]
        failed.add((i, position - len(literals[i])))
        return None

    return finish(0, 0)


class Tokenizer:
    """Text <-> ids for one checkpoint, and its chat template. Made by `load_tokenizer`."""

    def __init__(self, backend, special_tokens: dict[str, int], config: dict, chat_template: str | None, where: str,
                 template_file: str = "tokenizer_config.json"):
        self.backend, self.where = backend, where
        self.template_source = str(Path(where) / template_file)  # named in the chat template's error messages
        self.special_tokens = dict(special_tokens)
        self.special_names = {i: token for token, i in self.special_tokens.items()}
        self.vocab_size = max([backend.vocab_size, *(i + 1 for i in self.special_names)])
        names = ("bos_token", "eos_token", "unk_token", "pad_token")  # what HF hands the template
        for name in names:
            if not isinstance(_token_text(config.get(name)), (str, type(None))):
                raise ValueError(f"{where}: tokenizer_config.json '{name}' is {config[name]!r}, not a string or "
                                 "{\"content\": string}; re-download it")
        self.template_vars = {name: _token_text(config[name]) for name in names if _token_text(config.get(name))}
        self.bos_token, self.eos_token = self.template_vars.get("bos_token"), self.template_vars.get("eos_token")
        self.bos_id, self.eos_id = self.special_tokens.get(self.bos_token), self.special_tokens.get(self.eos_token)
        self.chat_template = chat_template
        self.render_seconds, self.renders = 0.0, 0          # the template's time so far (SLOW_TEMPLATE_*)
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self.special_regex = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")

    def encode(self, text: str) -> list[int]:
        """Ids of user text: special-token strings stay text, no BOS is added."""
        _refuse_lone_surrogate(text, "the text to encode")  # tiktoken would silently encode U+FFFD instead
        return self._encode_text(text)

    def _encode_text(self, text: str, at_start: bool = True) -> list[int]:
        """The backend's ids of text in which special-token strings stay text. Sentencepiece matches its
        user-defined pieces (Gemma's <start_of_turn>) anywhere in a text, so there each such string is cut
        after its first character and the parts are encoded apart, with no space between them."""
        ids = self.backend.encode(text, at_start)
        if self.special_names.keys().isdisjoint(ids):
            return ids
        cuts = [found.start() + 1 for found in self.special_regex.finditer(text)]
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        ids = [i for k, part in enumerate(parts) for i in self.backend.encode(part, at_start, glued=k > 0)]
        if special := next((self.special_names[i] for i in ids if i in self.special_names), None):
            raise ValueError(f"{self.where}: the text {_one_line(text)[:60]!r} encodes to the special token "
                             f"{special!r}, which user text must never become; remove it from the text")
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        parts, run = [], []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if i not in self.special_names:
                run.append(i)
                continue
            parts += [self.backend.decode(run, at_start=not parts), "" if skip_special else self.special_names[i]]
            run = []
        return "".join(parts) + self.backend.decode(run, at_start=not parts)

    def token_id(self, token: str) -> int:
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special or added token of {self.where} "
                           f"(it has {len(self.special_tokens)}, e.g. {list(self.special_tokens)[:5]})")
        return self.special_tokens[token]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool, **options) -> str:
        """The chat as text, rendered like transformers' apply_chat_template; `options` are the template's own
        variables (Qwen3's enable_thinking), as apply_chat_template passes its extra keywords."""
        if self.chat_template is None:
            raise ValueError(f"{self.where} has no chat template (no 'chat_template' in tokenizer_config.json, or "
                             "none named 'default' in its list, and no chat_template.jinja); add the model's to the folder")
        messages = [{key: value for key, value in m.items() if value is not None} for m in messages]  # as HF does
        for index, message in enumerate(messages):
            for key, value in message.items():
                if isinstance(value, str):
                    _refuse_lone_surrogate(value, f"message {index}: field {key!r}")
        if (size := _text_size(messages)) > MAX_TEMPLATE_CHARS // 4:  # the template's limits would blame it
            raise ValueError(f"the chat is {size} characters long; nanokv renders chats of up to "
                             f"{MAX_TEMPLATE_CHARS // 4} (more than any model's context holds)")
        source = self.template_source
        try:
            template = _compile_chat_template(self.chat_template)
            start = time.monotonic()
            text = _render_bounded(template, dict(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  tools=None, documents=None, **self.template_vars, **options))
            self.render_seconds, self.renders = self.render_seconds + time.monotonic() - start, self.renders + 1
            if self.render_seconds > SLOW_TEMPLATE_SECONDS and self.render_seconds > SLOW_TEMPLATE_MEAN * self.renders:
                raise _TemplateOverBudget(f"it took {self.render_seconds:.1f} s for {self.renders} rendering(s), "
                                          f"more than {SLOW_TEMPLATE_MEAN * 1000:g} ms each on average")
        except _TemplateOverBudget as err:
            raise ValueError(f"refused the chat template in {source}: {err}; a real chat template stays far below "
                             "these limits, so replace it with the model's original one") from None
        except RecursionError:
            raise ValueError(f"refused the chat template in {source}: it recurses or nests too deeply (e.g. a macro "
                             "or a recursive loop calling itself without end); replace it with the model's original "
                             "one") from None
        except MemoryError:  # a path the budget does not cover
            raise ValueError(f"refused the chat template in {source}: it ran out of memory; replace it with the "
                             "model's original one") from None
        except _TemplateRaised as err:  # the template's own raise_exception: it does not accept this chat
            raise ValueError(f"the chat template in {source} rejects this chat with its own message: "
                             f"{_one_line(str(err.message))[:500]}") from None
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"the chat template in {source} is not valid Jinja (line {err.lineno}: "
                             f"{_one_line(str(err.message))}); fix or replace it") from None
        except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"the chat template in {source} failed while rendering ({type(err).__name__}: "
                             f"{_one_line(str(err))[:500]}); fix or replace it") from None
        if found := LONE_SURROGATE.search(text):  # the messages hold none: the template's own text does
            raise ValueError(f"the chat template in {source} writes a lone surrogate ({ascii(found.group())}), which "
                             "is not text (UTF-8 cannot encode it); fix or replace it")
        return text

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool, answer_prefix: str = "",
                    **options) -> ChatEncoding:
        """Render and encode a chat; special tokens are recognised only outside the message contents.
        `answer_prefix`: text that starts the answer, after the generation prompt, encoded with the chat in one
        string as kvpress's pipeline does (and, like a content, never as special tokens)."""
        text, content_ranges, spans, leads = self._locate_contents(messages, add_generation_prompt, **options)
        if answer_prefix:
            _refuse_lone_surrogate(answer_prefix, "the answer prefix")
            content_ranges, text = [*content_ranges, (len(text), len(text) + len(answer_prefix))], text + answer_prefix
        ids, offsets = self._encode_rendered(text, content_ranges)
        return ChatEncoding(ids, text, offsets, spans, leads)

    def _encode_rendered(self, text: str, content_ranges: list[tuple[int, int]]) -> tuple[list, list]:
        """Ids and char offsets of a rendered chat whose message contents lie at content_ranges."""
        specials, gap_start = [], 0
        for gap_end, next_start in [*content_ranges, (len(text), len(text))]:
            specials += self.special_regex.finditer(text, gap_start, gap_end)
            gap_start = next_start
        ids, offsets, cursor = [], [], 0
        for piece in [*specials, None]:
            end = piece.start() if piece else len(text)
            if end > cursor:  # template text and contents between two special tokens: one piece, as HF does
                piece_ids = self._encode_text(text[cursor:end], at_start=cursor == 0)
                ids += piece_ids
                offsets += _char_offsets(text[cursor:end], self.backend.token_bytes(piece_ids), cursor)
            if piece:
                ids.append(self.special_tokens[piece.group()])
                offsets.append(piece.span())
                cursor = piece.end()
        return ids, offsets

    def _locate_contents(self, messages: list[dict], add_generation_prompt: bool, **options):
        """Render the chat, and find where each message content lands in it. The template is rendered a
        second time with a marker for each content, so the text around the markers is the template's own;
        the real rendering must be that text with each content (or content trimmed) in place of its marker."""
        for index, message in enumerate(messages):
            if not isinstance(message.get("content"), str):
                raise ValueError(f"message {index} has no string 'content' (nanokv encodes text chats only)")
            for key, value in message.items():  # other fields (role, name) are read as template text
                suspicious = isinstance(value, str) and (self.special_regex.search(value) or "\ue000" in value)
                if key != "content" and suspicious:
                    raise ValueError(f"message {index}: field {key!r} holds a special token; only 'content' may")
        text = self.render_chat(messages, add_generation_prompt, **options)
        skeleton = self.render_chat([{**m, "content": CONTENT_MARK.format(i)} for i, m in enumerate(messages)],
                                    add_generation_prompt, **options)
        literals, choices, owners, position = [], [], [], 0
        for mark in re.finditer(CONTENT_MARK.format(r"(\d+)"), skeleton):
            content = messages[int(mark.group(1))]["content"]
            literals.append(skeleton[position:mark.start()])
            choices.append(list(dict.fromkeys([content, content.strip(), content.lstrip(), content.rstrip()])))
            owners.append(int(mark.group(1)))
            position = mark.end()
        if absent := sorted(set(range(len(messages))) - set(owners)):
            folded_system = any(messages[i].get("role") == "system" for i in absent)
            raise ValueError(f"the chat template in {self.template_source} does not render the content of message(s) "
                             f"{absent} in place: it drops them or folds them into another message"
                             + (" (Mistral's folds the system message into the last user turn)" if folded_system else "")
                             + "; nanokv needs a template that writes each message where it stands")
        content_ranges = _fill_in(text, [*literals, skeleton[position:]], choices)
        if content_ranges is None:
            raise ValueError(f"the chat template in {self.template_source} changes message contents beyond trimming, so "
                             "nanokv cannot tell its text from user text; refusing to guess where special tokens are")
        spans, leads = {}, {}
        for owner, (start, end) in zip(owners, content_ranges):
            if owner not in spans:
                content, rendered = messages[owner]["content"], text[start:end]
                spans[owner], leads[owner] = (start, end), content.find(rendered) if rendered else 0
        order = range(len(messages))
        return text, content_ranges, [spans[i] for i in order], [leads[i] for i in order]

    def replay(self, system: ChatEncoding):
        """How KVzip has the model repeat this system turn (policies.Replay), with kvpress 0.5.5's prompts: the
        turn's tokens after the template's header, after "Repeat the previous context exactly." and the
        template's end of a user turn and assistant header (what follows a user message's content when the
        template renders one with the generation prompt)."""
        from policies import Replay
        separator = "\n" + "#" * 13
        rendered = self.render_chat([{"role": "user", "content": "dummy context" + separator}], add_generation_prompt=True)
        suffix = rendered.split(separator)[-1]
        pieces = [*self.special_regex.finditer(suffix), None]                  # the template's special tokens count
        suffix_ids, cursor = [], 0
        for piece in pieces:
            end = piece.start() if piece else len(suffix)
            suffix_ids += self.backend.encode(suffix[cursor:end], at_start=cursor == 0) if end > cursor else []
            if piece:
                suffix_ids.append(self.special_tokens[piece.group()])
                cursor = piece.end()
        start = next(t for t, (_, end) in enumerate(system.offsets) if end > system.content_spans[0][0])
        return Replay(start, self.encode("\n\nRepeat the previous context exactly."),
                      self.encode("\n\nRepeat the part of the previous context exactly, starting with"), suffix_ids)

    def chat_ids(self, system: str, user: str, enable_thinking: bool | None = None,
                 answer_prefix: str = "") -> tuple[ChatEncoding, ChatEncoding]:
        """(the system turn, no generation prompt; system + user with the generation prompt, then `answer_prefix`).
        The first's ids are a prefix of the second's, so a cache prefilled with the system turn can be reused.

        The system turn is the system message rendered alone. A template with no system role that writes the
        system text at the start of the first user turn (Gemma 3's) renders nothing of it alone: there the
        system turn is the chat rendered up to the end of the system text (Gemma 3: <bos><start_of_turn>user,
        a newline, the system text), encoded on its own. enable_thinking (Qwen3) is passed to the template
        when given; None leaves it undefined, the template's default.
        """
        options = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        system_turn = [{"role": "system", "content": system}]
        whole = self.encode_chat(system_turn + [{"role": "user", "content": user}], add_generation_prompt=True,
                                 answer_prefix=answer_prefix, **options)
        if self._folds_system_into_first_user_turn(options):
            start, end = whole.content_spans[0]
            ids, offsets = self._encode_rendered(whole.text[:end], [(start, end)])
            head = ChatEncoding(ids, whole.text[:end], offsets, [(start, end)], whole.content_leads[:1])
        else:
            head = self.encode_chat(system_turn, add_generation_prompt=False, **options)  # its errors say what is wrong
        if whole.ids[:len(head.ids)] != head.ids:
            raise ValueError(f"the chat template in {self.template_source} does not render the system turn alone as "
                             "the start of the whole chat, so the system turn cannot be prefilled and compressed on "
                             "its own; use a template that writes the system message first, unchanged by what follows")
        return head, whole

    def _folds_system_into_first_user_turn(self, options: dict) -> bool:
        """Whether the template writes the system text only inside the first user turn, before its content
        (Gemma 3), not on its own nor in a later turn (Mistral's: the last user turn)."""
        marks = [CONTENT_MARK.format(i) for i in range(4)]
        try:
            if marks[0] in self.render_chat([{"role": "system", "content": marks[0]}], False, **options):
                return False
            roles = ("system", "user", "assistant", "user")
            chat = self.render_chat([{"role": r, "content": m} for r, m in zip(roles, marks)], True, **options)
        except ValueError:
            return False
        return chat.count(marks[0]) == 1 and chat.find(marks[0]) < chat.find(marks[1])


def load_tokenizer(folder) -> Tokenizer:
    """The tokenizer of a Hugging Face checkpoint folder (see the module docstring for what is read)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"tokenizer folder {folder} is a file, not a folder; pass the Hugging Face "
                                 "checkpoint folder that holds tokenizer.json or tokenizer.model")
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist; run `python weights/prepare.py` "
                                "or pass a Hugging Face checkpoint folder")
    config_path, json_path, model_path = (folder / "tokenizer_config.json", folder / "tokenizer.json",
                                          folder / "tokenizer.model")
    config = _read_json(config_path) if config_path.exists() else {}
    data = _read_json(json_path) if json_path.exists() else None
    try:
        if data is not None and (_is_byte_level(data) or not model_path.exists()):
            special_tokens = {token["content"]: token["id"] for token in data.get("added_tokens", [])}
            backend = _TiktokenBPE(data, json_path, special_tokens)
        elif model_path.exists():
            metaspace = (data or {}).get("pre_tokenizer") or {}
            legacy = metaspace.get("prepend_scheme") != "first" if data else config.get("legacy") is not False
            backend = _SentencePiece(model_path, legacy)
            special_tokens = backend.special_tokens | {
                token["content"]: int(i) for i, token in config.get("added_tokens_decoder", {}).items()}
            if not config:  # no tokenizer_config.json: bos/eos from the model itself
                config = {name: backend.sp.id_to_piece(i) for name, i in
                          (("bos_token", backend.sp.bos_id()), ("eos_token", backend.sp.eos_id())) if i >= 0}
        else:
            raise FileNotFoundError(f"{folder} holds neither tokenizer.json nor tokenizer.model; "
                                    "copy the tokenizer files of the checkpoint into it")
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"tokenizer files in {folder} are malformed ({type(err).__name__}: {err})") from None
    template, template_file = config.get("chat_template"), config_path.name
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        if not all(isinstance(entry, dict) and {"name", "template"} <= set(entry) for entry in template):
            raise ValueError(f"{config_path}: 'chat_template' is a list, but not of {{\"name\", \"template\"}} "
                             "objects; re-download tokenizer_config.json")
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    if (jinja_path := folder / "chat_template.jinja").exists():  # newer checkpoints keep it in its own file
        try:
            template, template_file = jinja_path.read_text(encoding="utf-8"), jinja_path.name
        except UnicodeDecodeError as err:
            raise ValueError(f"{jinja_path} is not UTF-8 text ({err}); re-download it") from None
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{folder / template_file}: 'chat_template' is of type {type(template).__name__}, not a string "
                         "of Jinja; re-download tokenizer_config.json")
    return Tokenizer(backend, special_tokens, config, template, str(folder), template_file)
