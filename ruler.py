"""RULER's synthetic tasks, generated locally: find and track facts in a long system turn.

RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv 2404.06654) measures retrieval and aggregation in contexts of a set length in
tokens. This module writes its synthetic tasks as its repository (NVIDIA/RULER) defines them:
the generators scripts/data/synthetic/{niah, variable_tracking, common_words_extraction,
freq_words_extraction}.py, the templates of scripts/data/synthetic/constants.py, the settings
per task of scripts/synthetic.yaml and the scorers of scripts/eval/synthetic/constants.py.

  niah_*   needle in a haystack: "One of the special magic numbers for {key} is: {value}." hidden
           in filler. single_1/2/3 (one key, one value), multikey_1/2/3 (distractor keys; in 2 and 3
           the haystack itself is distractor needles), multivalue (four values of one key),
           multiquery (four keys asked at once)
  vt       variable tracking: "VAR QPWMZ = 40189", "VAR KDJRA = VAR QPWMZ", ... (4 hops) among noise
           lines; name every variable that holds the value
  cwe      common-words extraction: a numbered list in which 10 words repeat more often than the rest
  fwe      frequent-words extraction: coded words drawn from a zeta law (alpha 2); name the top three

The paper's protocol splits each prompt in two: the context (RULER's instruction line, the one-shot
example of vt and cwe, then the haystack) is the SYSTEM turn, compressed before the question is
known, and the question is the USER turn. RULER's answer prefix ("The special magic number for ...
is") is kept on the example (`answer_prefix`); evaluate.py sends it only with --answer-prefix.
Every example records the character spans in its system text of the facts its answer needs, of
distractors, of the haystack, of the instruction and of the one-shot example (`Example.spans`),
for whitelists and fair partitions.

How this differs from RULER's own data:
- No Paul Graham essays (not available offline). Where RULER hides needles in essays (niah_single_2
  and _3, multikey_1, multivalue, multiquery) the haystack is "words": sentences of random words
  from the short built-in list WORDS. RULER's "noise" and "needle" haystacks are reproduced as is.
- No `wonderwords` package: keys are adjective-noun pairs from WORDS (RULER: wonderwords'
  adjective-noun pairs), so a key's words also occur in a "words" haystack. cwe draws every word
  from WORDS or, when a list needs more words than WORDS has (past about 7.5K tokens of the
  default model), every word from deterministic pronounceable pseudo-words (RULER falls back to
  its english_words.json).
- Each needle's depth is drawn from RULER's 40 depths (RULER does that in essays and samples
  uniform positions in noise), or set for all needles with `depth`.
- The length is the whole chat-templated prompt (system + user + generation prompt) in the model's
  tokens, the nearest a whole number of haystack units gets to it; RULER's is a maximum that also
  counts the answer's tokens.
- vt's one-shot example has 5 noise lines (RULER's fills 500 tokens). Its variables and value,
  and the words of cwe's one-shot example, are never those of the question.
- One answer budget for every task (--max-new-tokens); RULER's tokens_to_generate is 128 for niah,
  30 for vt, 120 for cwe and 50 for fwe.
The same (tokenizer, task, length, seed, index, depth) gives byte-identical prompts.
"""
from __future__ import annotations

import dataclasses
import math
import random
import string
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) / 100 for i in range(40)]  # RULER's np.round(np.linspace(0, 100, 40))
ADJECTIVES = """able amber ancient autumn bitter black bold brave bright broad brown busy calm clean clever
    cold cool crimson curly damp dark deep dry dusty eager early easy empty fair fancy fast fierce flat fresh
    frozen gentle giant glad golden grand gray happy heavy hollow honest huge humble icy kind large late lazy
    light little lively long loud lucky mellow mighty misty modern narrow neat noble odd old orange pale plain
    polite proud purple quick quiet rapid rare red rich rough round royal rusty sandy sharp shiny short silent
    silver simple sleepy slow small smooth soft solid sour spicy steep sticky strong sunny sweet swift tall
    tame tender thick thin tidy tiny warm wet white wide wild wise young""".split()
NOUNS = """apple anchor arrow badge bakery banana basket beach bell bicycle bird blanket boat bottle bridge
    brush bucket butter button cabin camera candle canyon carpet castle cave chair cheese cherry circle cliff
    clock cloud coat coffee comet copper cottage cotton crayon desert desk diamond dinner dolphin door dragon
    drum eagle engine falcon feather fence field flag flower forest fountain fox garden gate glove goat guitar
    hammer harbor helmet hill horse island jacket jungle kettle kitten ladder lake lamp lantern leaf lemon lion
    lizard map meadow mirror monkey moon mountain nest ocean olive orchard owl paddle palace panda paper parrot
    pebble pencil pepper piano pillow planet pocket pond puzzle rabbit river robot rocket saddle salmon scarf
    shadow ship shoe spoon star stone storm street sugar table tiger tower train tree tulip turtle valley
    violin wagon wall whale window wolf zebra""".split()
VERBS = """bake bend bloom bounce build carry chase climb cook dance dig dream drift float fly fold gather
    glow grow hum jump knit laugh lift listen march mend paint plant play pour pull push read ride roll row
    run sail sew shine sing skate sleep slide smile spin swim throw wander wash whistle write""".split()
WORDS = sorted(set(ADJECTIVES + NOUNS + VERBS))
KEY_WORDS = [f"{adjective}-{noun}" for adjective in ADJECTIVES for noun in NOUNS]  # RULER: adj-noun keys


@dataclass(frozen=True)
class Task:
    """One task of RULER's scripts/synthetic.yaml."""
    kind: str                  # "niah", "vt", "cwe" or "fwe"
    haystack: str = "noise"    # niah: "noise", "words" (in place of RULER's "essay"), "needle"; cwe: "words"
    key_type: str = "words"    # niah: "words", "numbers" or "uuids"
    value_type: str = "numbers"
    n_keys: int = 1            # niah: needles' keys, values per key, keys asked
    n_values: int = 1
    n_queries: int = 1
    metric: str = "all"        # RULER scores every synthetic task with string_match_all


TASKS = {
    "niah_single_1": Task("niah", "noise"),
    "niah_single_2": Task("niah", "words"),
    "niah_single_3": Task("niah", "words", value_type="uuids"),
    "niah_multikey_1": Task("niah", "words", n_keys=4),
    "niah_multikey_2": Task("niah", "needle"),
    "niah_multikey_3": Task("niah", "needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": Task("niah", "words", n_values=4),
    "niah_multiquery": Task("niah", "words", n_keys=4, n_queries=4),
    "vt": Task("vt"),
    "cwe": Task("cwe", "words"),
    "fwe": Task("fwe"),
}


@dataclass
class Example:
    key: str                   # "task/length/seed/index" (+ "/depth" when set): names it, seeds it
    task: str
    system: str                # the context: compressed
    user: str                  # the question
    answers: list[str]         # the strings a right answer holds (all of them, for string_match_all)
    spans: dict[str, list[tuple[int, int]]]  # char spans in `system`: "instruction", "example", "fact",
                                             # "distractor", "haystack" (each present when non-empty)
    answer_prefix: str         # RULER's start of the answer (without its leading space, and vt's trailing one)
    n_tokens: int              # tokens of the chat: system + user + generation prompt
    depths: list[float] = field(default_factory=list)  # niah: each needle's depth in [0, 1], in text order


# ----------------------------------------------------------------------------- scoring (RULER's)

def string_match_all(response: str, references: list[str]) -> float:
    """The share of the references found in the response, case-insensitive."""
    return sum(r.lower() in response.lower() for r in references) / len(references)


def string_match_part(response: str, references: list[str]) -> float:
    """1 if any reference is found in the response, case-insensitive (RULER's QA metric)."""
    return max(float(r.lower() in response.lower()) for r in references)


METRICS = {"all": string_match_all, "part": string_match_part}


def score(example: Example, response: str) -> float:
    return METRICS[TASKS[example.task].metric](response, example.answers)


# ----------------------------------------------------------------------------- building blocks

def _join(pieces: list[tuple[str, str]]) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """[(kind, text)] -> the text and, per kind, its character spans (adjacent pieces merged)."""
    parts, spans, at = [], {}, 0
    for kind, text in pieces:
        if not text:
            continue
        runs = spans.setdefault(kind, [])
        if runs and runs[-1][1] == at:
            runs[-1] = (runs[-1][0], at + len(text))
        else:
            runs.append((at, at + len(text)))
        parts.append(text)
        at += len(text)
    return "".join(parts), spans


def _separated(units: list[tuple[str, str]], separator: str) -> list[tuple[str, str]]:
    """Units with a haystack separator between each two."""
    out = []
    for i, unit in enumerate(units):
        out += [("haystack", separator), unit] if i else [unit]
    return out


def _distinct(draw, n: int, taken: set) -> list[str]:
    """n new values from draw(), none already in `taken` (each added to it)."""
    out = []
    while len(out) < n:
        value = draw()
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def _drawer(rng: random.Random, kind: str):
    return {"numbers": lambda: str(rng.randint(10**6, 10**7 - 1)),           # RULER: 7 digits
            "words": lambda: rng.choice(KEY_WORDS),
            "uuids": lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))}[kind]


@lru_cache(maxsize=1)
def pseudo_words(n: int = 32768) -> tuple[str, ...]:
    """n distinct pronounceable words of three consonant-vowel syllables, the same every time."""
    rng = random.Random("ruler/pseudo-words")
    syllable = lambda: rng.choice("bdfgklmnprstvz") + rng.choice("aeiou")
    return tuple(_distinct(lambda: syllable() + syllable() + syllable(), n, set(WORDS)))


def _word_sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
    return " ".join([words[0].capitalize()] + words[1:]) + "."


# ----------------------------------------------------------------------------- the four generators
# Each is build(rng, size, task, length, depth) -> (pieces, user, answers, answer_prefix, depths), where
# pieces are (kind, text) and size counts haystack units. Draws that do not depend on `size` come
# first, so every size the fitting tries asks the same question.

def _niah(rng, size, task: Task, length, depth):
    taken = set()
    keys = _distinct(_drawer(rng, task.key_type), task.n_keys, taken)
    values = [_distinct(_drawer(rng, task.value_type), task.n_values, taken) for _ in keys]
    asked = rng.sample(range(task.n_keys), task.n_queries)
    kind = task.value_type
    needles = [("fact" if k in asked else "distractor", f"One of the special magic {kind} for {key} is: {value}.")
               for k, key in enumerate(keys) for value in values[k]]
    rng.shuffle(needles)
    depths = [depth] * len(needles) if depth is not None else rng.sample(DEPTHS, len(needles))
    if task.haystack == "needle":                                     # distractor needles
        draw_key, draw_value = _drawer(rng, task.key_type), _drawer(rng, task.value_type)
        filler = [f"One of the special magic {kind} for {k} is: {v}."
                  for k, v in zip(_distinct(draw_key, size, taken), _distinct(draw_value, size, taken))]
    else:
        filler = [NOISE] * size if task.haystack == "noise" else [_word_sentence(rng) for _ in range(size)]
    units = [("haystack", text) for text in filler]
    order = sorted(range(len(needles)), key=lambda i: depths[i], reverse=True)
    for i in order:                                                   # the deepest first: earlier indices hold
        units.insert(int(size * depths[i]), needles[i])
    query_keys = [keys[k] for k in asked]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    one = task.n_values * task.n_queries == 1                         # RULER's singular template
    noun, are, some = (kind[:-1], "is", "A") if one else (kind, "are", "Some")
    intro = (f"{some} special magic {noun} {are} hidden within the following text. Make sure to memorize it. "
             f"I will quiz you about the {noun} afterwards.\n")
    user = f"What {'is' if one else 'are all'} the special magic {noun} for {query} mentioned in the provided text?"
    prefix = f"The special magic {noun} for {query} mentioned in the provided text {are}"
    answers = [v for k in asked for v in values[k]]
    separator = "\n" if task.haystack in ("noise", "needle") else " "
    return [("instruction", intro)] + _separated(units, separator), user, answers, prefix, sorted(depths)


VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_HOPS = 4


def _vt_chain(rng, letters: int, taken: set, noise_lines: int, value: str):
    """A chain of VT_HOPS + 1 assignments placed in order among noise lines: (names, units)."""
    names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=letters)), VT_HOPS + 1, taken)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(VT_HOPS)]
    units = [("haystack", NOISE)] * noise_lines
    for j, position in enumerate(sorted(rng.sample(range(noise_lines), len(chain)))):
        units.insert(position + j, ("fact", chain[j]))                 # RULER's insertion: order kept
    return names, units


def _vt_question(value: str) -> tuple[str, str]:
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {VT_HOPS + 1} "
              f"variables are assigned the value {value}, they are:")
    return question, prefix


def _vt(rng, size, task, length, depth):
    taken, value = set(), str(rng.randint(10000, 99998))             # RULER: np.random.randint(10000, 99999)
    shot_value = _distinct(lambda: str(rng.randint(10000, 99998)), 1, {value})[0]
    shot_names, shot_units = _vt_chain(rng, 3, taken, 5, shot_value)  # the one-shot example: 3-letter names
    names, units = _vt_chain(rng, 5, taken, size, value)
    shot_question, shot_prefix = _vt_question(shot_value)
    shot = (VT_INTRO + "\n".join(text for _, text in shot_units)             # RULER: the answer after two spaces,
            + f"\n{shot_question} {shot_prefix}  {' '.join(shot_names)}\n\n")   # then a blank line
    user, prefix = _vt_question(value)
    return [("example", shot), ("instruction", VT_INTRO)] + _separated(units, "\n"), user, names, prefix, []


CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"


def _numbered(words: list[str], common: set) -> list[tuple[str, str]]:
    pieces = []
    for i, word in enumerate(words):
        pieces += [("haystack", f"{' ' if i else ''}{i + 1}. "), ("fact" if word in common else "haystack", word)]
    return pieces


class OutOfWords(ValueError):
    """A cwe list longer than its source has distinct words."""


def _cwe(rng, size, task, length, depth):
    """RULER: below 4096 tokens, common words 6 times and the rest once, one-shot 20 words (3/1);
    from 4096, 30 and 3 times, one-shot 40 words (10/3). 10 common words. Every word, the one-shot's
    included, comes from one source (task.haystack): WORDS, or pseudo-words when WORDS has too few."""
    (repeat_common, repeat_rare), (shot_words, shot_common, shot_rare) = (
        ((6, 1), (20, 3, 1)) if length < 4096 else ((30, 3), (40, 10, 3)))
    pool = WORDS if task.haystack == "words" else pseudo_words()     # one source for every word, as RULER
    if shot_words + size > len(pool):
        raise OutOfWords(len(pool))                                    # make_example moves on, or says so
    order = rng.sample(pool, len(pool))
    shot, words = order[:shot_words], order[shot_words:shot_words + size]
    shot_list = shot[:10] * shot_common + shot[10:] * shot_rare
    rng.shuffle(shot_list)
    shot_text = "".join(t for _, t in _numbered(shot_list, set()))
    shot_answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot[:10]))
    example = f"{CWE_INTRO}{shot_text}\n{CWE_QUESTION} {CWE_PREFIX} {shot_answer}\n"
    word_list = words[:10] * repeat_common + words[10:] * repeat_rare
    rng.shuffle(word_list)
    pieces = [("example", example), ("instruction", CWE_INTRO)] + _numbered(word_list, set(words[:10]))
    return pieces, CWE_QUESTION, words[:10], CWE_PREFIX, []


FWE_ALPHA, FWE_ZETA = 2.0, math.pi ** 2 / 6                          # zeta(2)
FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. "
             "Find the three most frequently appeared coded words. ")
FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. "
                "What are the three most frequently appeared words in the above coded text?")


def _fwe(rng, size, task, length, depth):
    """RULER: a vocabulary of (input tokens) // 50 six-letter coded words (its input: max_seq_length less the
    answer's 50 tokens; here `length` is the prompt alone), the first replaced by '...' (noise);
    word k appears int(size * k^-alpha / zeta(alpha)) times; the answer is words 2-4."""
    n_vocab = max(length // 50, 8)
    vocab = sorted(_distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=6)), n_vocab, set()))
    rng.shuffle(vocab)
    vocab[0] = "..."
    counts = [int(size * k ** -FWE_ALPHA / FWE_ZETA) for k in range(1, n_vocab + 1)]
    text = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(text)
    answers = vocab[1:4]
    pieces = [("instruction", FWE_INTRO)] + _separated(
        [("fact" if w in answers else "haystack", w) for w in text], " ")
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return pieces, FWE_QUESTION, answers, prefix, []


BUILDERS = {"niah": _niah, "vt": _vt, "cwe": _cwe, "fwe": _fwe}
SMALLEST = {"niah": 4, "vt": 8, "cwe": 16, "fwe": 64}                # haystack sizes the fitting starts from


# ----------------------------------------------------------------------------- generation

def prompt_tokens(tok, system: str, user: str) -> int:
    """Tokens of the chat the model reads: the system turn, the user turn and the generation prompt
    (len(tok.chat_ids(system, user)[1].ids), in one encoding)."""
    chat = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return len(tok.encode_chat(chat, add_generation_prompt=True).ids)


def make_example(tok, task: str, length: int, seed: int = 0, index: int = 0, depth: float | None = None) -> Example:
    """Example `index` of `task` whose prompt is as near `length` tokens as a whole number of haystack
    units allows (within half a unit, either side: a noise line is 24 tokens of the default model, a
    uuid needle 60; leave that and the answer's room below the model's context), counted with `tok`'s
    chat template. `depth` in [0, 1] puts every needle of a niah task there (else drawn per needle)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r} (choose from {', '.join(TASKS)})")
    spec = TASKS[task]
    if depth is not None and (spec.kind != "niah" or not 0.0 <= depth <= 1.0):
        raise ValueError(f"depth {depth} applies to niah tasks only and must lie in [0, 1]")
    key = f"{task}/{length}/{seed}/{index}" + ("" if depth is None else f"/{depth}")
    example = _fit(tok, task, key, spec, length, depth)
    if example is None:                                               # cwe: WORDS ran out, so every word is a
        example = _fit(tok, task, key, dataclasses.replace(spec, haystack="pseudo"), length, depth)   # pseudo-word
    if example is None:
        raise ValueError(f"{task}: {length} tokens needs more distinct words than the {len(pseudo_words())} "
                         "pseudo-words cwe can draw")
    return example


def _fit(tok, task: str, key: str, spec: Task, length: int, depth: float | None) -> Example | None:
    """The example of `spec` nearest `length` tokens: two secant steps from the smallest size, then bracket and
    bisect (the largest size that fits, and the next). None when its words ran out before it reached `length`."""
    memo = {}

    def at(size):                                                     # the example with `size` haystack units
        if size not in memo:                                          # (None: more words than its source has)
            try:
                pieces, user, answers, prefix, depths = BUILDERS[spec.kind](random.Random(key), size, spec, length,
                                                                            depth)
            except OutOfWords:
                memo[size] = None
            else:
                system, spans = _join(pieces)
                memo[size] = Example(key, task, system, user, answers, spans, prefix,
                                     prompt_tokens(tok, system, user), depths)
        return memo[size]

    def tokens(size):
        return math.inf if at(size) is None else at(size).n_tokens

    size = SMALLEST[spec.kind]
    if tokens(size) > length:
        raise ValueError(f"{task}: {length} tokens is too short (the smallest haystack gives "
                         f"{tokens(size)})")
    guess = 2 * size
    for _ in range(2):
        per_unit = max(1.0, (tokens(guess) - tokens(size)) / (guess - size)) if at(guess) else 1.0
        guess = max(size + 1, size + round((length - tokens(size)) / per_unit))
    step = max(1, guess // 256)
    while tokens(guess) > length:
        guess, step = max(size, guess - step), 2 * step
    size, high = guess, guess + step
    while tokens(high) <= length:
        size, high, step = high, high + 2 * step, 2 * step
    while high - size > 1:
        middle = (size + high) // 2
        size, high = (middle, high) if tokens(middle) <= length else (size, middle)
    below, above = at(size), at(high)                                 # the nearer of the two
    if above is None:                                                 # the words ran out: not near enough
        return None
    return below if length - below.n_tokens <= above.n_tokens - length else above


def make_examples(tok, task: str, length: int, n: int, seed: int = 0, depth: float | None = None) -> list[Example]:
    return [make_example(tok, task, length, seed, index, depth) for index in range(n)]
