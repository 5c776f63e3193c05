"""ruler.py: RULER's synthetic tasks hold exactly the facts their answers need, at the requested
length and depth, the same for the same seed; RULER's string-match scorers."""
import collections
import re
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ruler  # noqa: E402
from ruler import TASKS, make_example, score, string_match_all, string_match_part  # noqa: E402

NIAH = [name for name, task in TASKS.items() if task.kind == "niah"]
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for ([\w-]+) is: ([\w-]+)\.")


class WordTokens:
    """A stand-in tokenizer for tests of content: one token per whitespace-separated word of the contents."""

    def encode_chat(self, messages, add_generation_prompt):
        return types.SimpleNamespace(ids=" ".join(m["content"] for m in messages).split())


@pytest.fixture(scope="module")
def tok(default_model_folder):
    from tokenizer import load_tokenizer
    return load_tokenizer(default_model_folder)


def examples(task, n=4, length=1024, **settings):
    return [make_example(WordTokens(), task, length, seed=7, index=i, **settings) for i in range(n)]


def texts(example, kind):
    return [example.system[s:e] for s, e in example.spans.get(kind, [])]


def test_the_tasks_are_rulers_synthetic_ones():
    assert set(TASKS) == {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                          "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"}


# ----------------------------------------------------------------------------- the facts

@pytest.mark.parametrize("task", NIAH)
def test_niah_holds_exactly_the_needles_its_answer_needs(task):
    spec = TASKS[task]
    for example in examples(task):
        table = collections.defaultdict(list)                        # every needle in the context, read back
        for _, key, value in NEEDLE.findall(example.system):
            table[key].append(value)
        asked = re.fullmatch(r"What (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\?",
                             example.user).group(1)
        asked = re.split(r", and |, ", asked)
        assert len(asked) == spec.n_queries and all(key in table for key in asked)
        assert sorted(example.answers) == sorted(v for key in asked for v in table[key])
        assert all(len(table[key]) == spec.n_values for key in asked)
        assert all(example.system.count(value) == 1 for value in example.answers)
        others = [v for key, values in table.items() if key not in asked for v in values]
        assert not set(others) & set(example.answers)                # a distractor's value is never expected
        n_distractors = (spec.n_keys - spec.n_queries) * spec.n_values
        assert len(others) >= n_distractors and (spec.haystack == "needle" or len(others) == n_distractors)
        facts = [NEEDLE.fullmatch(text) for text in texts(example, "fact")]   # the spans: one needle each
        assert all(facts) and sorted(f.group(3) for f in facts) == sorted(example.answers)
        assert len(texts(example, "distractor")) == n_distractors
        assert not any(value in text for value in example.answers for text in texts(example, "haystack"))
        one = spec.n_values * spec.n_queries == 1
        assert example.user.startswith("What is" if one else "What are all")


def resolve_assignments(text):
    """An independent little interpreter: every VAR line, each variable followed to its number."""
    assigned = dict(re.findall(r"^VAR ([A-Z]+) = (\d+|VAR [A-Z]+) ?$", text, flags=re.M))
    assert len(assigned) == len(re.findall(r"^VAR ", text, flags=re.M)), "a variable assigned twice"

    def value(name, seen=()):
        assert name not in seen, "a cycle"
        right = assigned[name]
        return value(right[4:], seen + (name,)) if right.startswith("VAR ") else right
    return {name: value(name) for name in assigned}


def test_variable_tracking_chains_resolve_to_the_expected_names():
    for example in examples("vt"):
        asked = re.fullmatch(r"Question: Find all variables that are assigned the value (\d+) in the text above\.",
                             example.user).group(1)
        values = resolve_assignments(example.system)                # the one-shot example's chain included
        assert sorted(name for name, v in values.items() if v == asked) == sorted(example.answers)
        assert len(example.answers) == ruler.VT_HOPS + 1
        facts = texts(example, "fact")
        assert len(facts) == ruler.VT_HOPS + 1 and set(resolve_assignments("\n".join(facts))) == set(example.answers)
        shot = resolve_assignments(texts(example, "example")[0])
        assert len(set(shot.values())) == 1 and asked not in shot.values() and not set(shot) & set(example.answers)


def test_variable_tracking_is_written_as_ruler_writes_it():
    """RULER's whitespace: a hop's line ends with a space (its value's does not), the one-shot answer follows
    "they are:" after two spaces, and a blank line parts the one-shot example from the task."""
    for example in examples("vt"):
        lines = [line for line in example.system.split("\n") if line.startswith("VAR ")]
        assert len(lines) == 2 * (ruler.VT_HOPS + 1)                   # the one-shot's chain and the task's
        assert sum(line.endswith(" ") for line in lines) == 2 * ruler.VT_HOPS
        assert all(re.fullmatch(r"VAR [A-Z]+ = \d+", line) for line in lines if not line.endswith(" "))
        shot = texts(example, "example")[0]
        assert re.search(r"they are:  [A-Z]{3}( [A-Z]{3}){4}\n\n$", shot)
        assert example.system[len(shot):].startswith(ruler.VT_INTRO)


def numbered(text):
    words = re.findall(r"(\d+)\. (\w+)", text)
    assert [int(n) for n, _ in words] == list(range(1, len(words) + 1))
    return collections.Counter(w for _, w in words)


@pytest.mark.parametrize("length", [1024, 4096])
def test_common_words_are_the_ten_most_common(length):
    for example in examples("cwe", n=2, length=length):
        start = example.spans["instruction"][0][1]                     # the list after the instruction
        counts = numbered(example.system[start:])
        top = min(counts[w] for w in example.answers)
        assert len(example.answers) == 10 and top == (6 if length < 4096 else 30)
        assert all(c < top for w, c in counts.items() if w not in example.answers)
        shot_list = texts(example, "example")[0].split("\nQuestion:")[0]
        assert not set(numbered(shot_list)) & set(counts)                # the one-shot's words are others
        assert sorted(texts(example, "fact")) == sorted(w for w in example.answers for _ in range(top))


def test_common_words_come_from_one_source_whatever_their_rank():
    """RULER draws every word of a list, the ten answers included, from one source: the real words while they
    suffice, else pseudo-words only (never real answers among pseudo-words, which would give them away)."""
    real, pseudo = set(ruler.WORDS), set(ruler.pseudo_words())
    for length, source in ((400, real), (8192, pseudo)):
        for example in examples("cwe", n=2, length=length):
            start = example.spans["instruction"][0][1]
            words = set(numbered(example.system[start:]))
            assert words <= source and set(example.answers) <= source and len(words) > 10


def test_common_words_past_their_pool_refuse_instead_of_hanging(monkeypatch):
    """A list longer than the distinct words there are to draw is refused (it used to stop growing, and the
    search for its length never ended)."""
    monkeypatch.setattr(ruler, "pseudo_words", lambda: tuple(f"w{i}" for i in range(400)))   # WORDS: 309
    with pytest.raises(ValueError, match="needs more distinct words than the 400 pseudo-words"):
        make_example(WordTokens(), "cwe", 20000)


def test_frequent_words_are_the_three_most_frequent():
    for example in examples("fwe"):
        start = example.spans["instruction"][0][1]
        counts = collections.Counter(example.system[start:].split())
        assert counts.most_common(1)[0][0] == "..."
        del counts["..."]
        ranked = [w for w, _ in counts.most_common()]
        assert sorted(ranked[:3]) == sorted(example.answers) and counts[ranked[2]] > counts[ranked[3]]


@pytest.mark.parametrize("task", list(TASKS))
def test_spans_partition_the_system_turn(task):
    example = examples(task, n=1)[0]
    spans = sorted(s for runs in example.spans.values() for s in runs)
    assert spans[0][0] == 0 and spans[-1][1] == len(example.system)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))       # disjoint, no gap
    assert set(example.spans) <= {"instruction", "example", "fact", "distractor", "haystack"}
    assert example.spans["fact"] and example.spans["instruction"]


# ----------------------------------------------------------------------------- length, depth, seeds

@pytest.mark.parametrize("length", [1024, 4096, 8192])
def test_length_in_tokens_within_5_percent(tok, length):
    for task in TASKS:
        example = make_example(tok, task, length, seed=1)
        assert example.n_tokens == len(tok.chat_ids(example.system, example.user)[1].ids)
        assert abs(example.n_tokens - length) <= 0.05 * length, (task, example.n_tokens)


def needle_depths(tok, example):
    """Each needle's depth: haystack tokens before it / all haystack tokens (the system turn's tokens)."""
    head = tok.chat_ids(example.system, example.user)[0]
    in_haystack = [False] * len(head.ids)
    for s, e in example.spans["haystack"]:
        t0, t1 = head.token_span(0, s, e)
        in_haystack[t0:t1] = [True] * (t1 - t0)
    needles = sorted(example.spans["fact"] + example.spans.get("distractor", []))
    starts = [head.token_span(0, s, e)[0] for s, e in needles]
    return [sum(in_haystack[:t]) / sum(in_haystack) for t in starts]


def units_before_needles(example):
    """Per needle, (haystack units before it, all haystack units): a unit is a noise line (5 periods),
    a sentence of words or a distractor needle (1 period each)."""
    periods = 5 if TASKS[example.task].haystack == "noise" else 1
    haystack = example.spans["haystack"]
    total = sum(example.system[s:e].count(".") for s, e in haystack) / periods
    needles = sorted(example.spans["fact"] + example.spans.get("distractor", []))
    return [(sum(example.system[s:e].count(".") for s, e in haystack if e <= start) / periods, total)
            for start, _ in needles]


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_2", "niah_multivalue"])
def test_needles_sit_at_the_requested_depth(tok, task):
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        example = make_example(tok, task, 2048, depth=depth)
        assert example.depths == [depth] * len(example.depths)
        assert all(before == int(total * depth) for before, total in units_before_needles(example))  # RULER's rule
        assert all(abs(d - depth) <= 0.02 for d in needle_depths(tok, example)), (depth, needle_depths(tok, example))
    for index in range(3):                                           # drawn from RULER's 40 depths
        example = make_example(tok, task, 2048, index=index)
        assert set(example.depths) <= set(ruler.DEPTHS)
        assert [before for before, _ in units_before_needles(example)] == \
               [int(total * d) for (_, total), d in zip(units_before_needles(example), example.depths)]
        assert all(abs(m - d) <= 0.02 for m, d in zip(needle_depths(tok, example), example.depths))


def test_same_seed_same_bytes_other_seed_other_prompts():
    for task in TASKS:
        a, b = examples(task, n=2), examples(task, n=2)
        assert [(x.system.encode(), x.user.encode(), x.answers, x.spans) for x in a] == \
               [(x.system.encode(), x.user.encode(), x.answers, x.spans) for x in b]
        assert a[0].system != a[1].system                              # another index
        other = make_example(WordTokens(), task, 1024, seed=8, index=0)
        assert other.system != a[0].system and other.answers != a[0].answers


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="unknown RULER task 'niah'"):
        make_example(WordTokens(), "niah", 1024)
    with pytest.raises(ValueError, match="too short"):
        make_example(WordTokens(), "niah_single_1", 20)
    with pytest.raises(ValueError, match="depth"):
        make_example(WordTokens(), "vt", 1024, depth=0.5)
    with pytest.raises(ValueError, match="depth"):
        make_example(WordTokens(), "niah_single_1", 1024, depth=1.5)


# ----------------------------------------------------------------------------- scoring

def test_string_match_all_and_part():
    assert string_match_all("The special magic number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("It is 123456.", ["1234567"]) == 0.0
    assert string_match_all("ABCDE, fghij and KLMNO", ["abcde", "FGHIJ", "klmno", "PQRST"]) == 0.75
    assert string_match_all("", ["x", "y"]) == 0.0
    assert string_match_part("Paris, I think", ["London", "paris"]) == 1.0
    assert string_match_part("Rome", ["London", "paris"]) == 0.0


def test_score_uses_the_examples_answers():
    example = examples("niah_multivalue", n=1)[0]
    two = f"{example.answers[0]} and {example.answers[2].upper()}"
    assert score(example, two) == 0.5
    assert score(example, " ".join(example.answers)) == 1.0
    vt = examples("vt", n=1)[0]
    assert score(vt, "they are: " + " ".join(name.lower() for name in vt.answers)) == 1.0
