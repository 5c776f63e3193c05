"""Tests of ifeval.py: hand-written cases for every instruction, then parity with
Google's original IFEval checker (loaded by tests/ifeval_reference.py) on
generated responses. `python3 tests/test_ifeval.py` prints the parity table.
"""

from __future__ import annotations

import collections
import json
import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ifeval  # noqa: E402
import ifeval_reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SYS_IFEVAL = ROOT.parent / "shared" / "data" / "paper" / "sys_ifeval.jsonl"

# ------------------------------------------------------------------ texts used below

LANGUAGE_TEXTS = {
    "en": "The committee met on Tuesday to discuss the new budget. Several members raised "
          "concerns about the cost of the project, but the chair promised a detailed report next month.",
    "fr": "Le comité s'est réuni mardi pour discuter du nouveau budget. Plusieurs membres ont exprimé "
          "des inquiétudes quant au coût du projet, mais la présidente a promis un rapport détaillé.",
    "de": "Der Ausschuss traf sich am Dienstag, um den neuen Haushalt zu besprechen. Mehrere Mitglieder "
          "äußerten Bedenken wegen der Kosten des Projekts.",
    "it": "Il comitato si è riunito martedì per discutere il nuovo bilancio. Diversi membri hanno "
          "espresso preoccupazioni sul costo del progetto.",
    "pt": "O comitê se reuniu na terça-feira para discutir o novo orçamento. Vários membros "
          "manifestaram preocupação com o custo do projeto.",
    "ru": "Комитет собрался во вторник, чтобы обсудить новый бюджет. Несколько членов выразили "
          "обеспокоенность стоимостью проекта.",
    "bg": "Комитетът се събра във вторник, за да обсъди новия бюджет. Няколко членове изразиха "
          "загриженост за цената на проекта.",
    "hi": "समिति ने नए बजट पर चर्चा करने के लिए मंगलवार को बैठक की। कई सदस्यों ने परियोजना की "
          "लागत के बारे में चिंता व्यक्त की।",
    "mr": "नवीन अर्थसंकल्पावर चर्चा करण्यासाठी समितीची मंगळवारी बैठक झाली. अनेक सदस्यांनी "
          "प्रकल्पाच्या खर्चाबद्दल चिंता व्यक्त केली.",
    "ne": "नयाँ बजेटबारे छलफल गर्न समितिको मंगलबार बैठक बस्यो। धेरै सदस्यहरूले परियोजनाको लागतबारे चिन्ता व्यक्त गरे।",
    "ar": "اجتمعت اللجنة يوم الثلاثاء لمناقشة الميزانية الجديدة. أعرب عدد من الأعضاء عن قلقهم بشأن تكلفة المشروع.",
    "fa": "کمیته روز سه‌شنبه برای بحث درباره بودجه جدید تشکیل جلسه داد. چند عضو درباره هزینه پروژه ابراز نگرانی کردند.",
    "ur": "کمیٹی نے نئے بجٹ پر بات کرنے کے لیے منگل کو اجلاس کیا۔ کئی اراکین نے منصوبے کی لاگت کے بارے میں تشویش کا اظہار کیا۔",
    "ko": "위원회는 새 예산을 논의하기 위해 화요일에 모였다. 여러 위원들이 사업 비용에 대해 우려를 표명했다.",
    "th": "คณะกรรมการประชุมกันในวันอังคารเพื่อหารือเกี่ยวกับงบประมาณใหม่ สมาชิกหลายคนแสดงความกังวลเกี่ยวกับค่าใช้จ่ายของโครงการ",
    "vi": "Ủy ban đã họp vào thứ Ba để thảo luận về ngân sách mới. Một số thành viên bày tỏ lo ngại về chi phí của dự án.",
    "fi": "Valiokunta kokoontui tiistaina keskustelemaan uudesta talousarviosta. Useat jäsenet olivat "
          "huolissaan hankkeen kustannuksista.",
    "sw": "Kamati ilikutana Jumanne kujadili bajeti mpya. Wanachama kadhaa walionyesha wasiwasi kuhusu gharama ya mradi.",
    "bn": "কমিটি নতুন বাজেট নিয়ে আলোচনা করতে মঙ্গলবার বৈঠক করেছে। কয়েকজন সদস্য প্রকল্পের খরচ নিয়ে উদ্বেগ প্রকাশ করেছেন।",
    "ta": "புதிய வரவு செலவுத் திட்டம் குறித்து விவாதிக்க குழு செவ்வாய்க்கிழமை கூடியது. பல உறுப்பினர்கள் கவலை தெரிவித்தனர்.",
    "te": "కొత్త బడ్జెట్ గురించి చర్చించడానికి కమిటీ మంగళవారం సమావేశమైంది. చాలా మంది సభ్యులు ఆందోళన వ్యక్తం చేశారు.",
    "gu": "નવા બજેટ વિશે ચર્ચા કરવા માટે સમિતિ મંગળવારે મળી હતી. ઘણા સભ્યોએ પ્રોજેક્ટના ખર્ચ અંગે ચિંતા વ્યક્ત કરી.",
    "pa": "ਨਵੇਂ ਬਜਟ ਬਾਰੇ ਚਰਚਾ ਕਰਨ ਲਈ ਕਮੇਟੀ ਦੀ ਮੰਗਲਵਾਰ ਨੂੰ ਮੀਟਿੰਗ ਹੋਈ। ਕਈ ਮੈਂਬਰਾਂ ਨੇ ਲਾਗਤ ਬਾਰੇ ਚਿੰਤਾ ਜ਼ਾਹਰ ਕੀਤੀ।",
    "kn": "ಹೊಸ ಬಜೆಟ್ ಬಗ್ಗೆ ಚರ್ಚಿಸಲು ಸಮಿತಿ ಮಂಗಳವಾರ ಸಭೆ ಸೇರಿತು. ಹಲವಾರು ಸದಸ್ಯರು ಯೋಜನೆಯ ವೆಚ್ಚದ ಬಗ್ಗೆ ಕಳವಳ ವ್ಯಕ್ತಪಡಿಸಿದರು.",
}

SENTENCES = [
    "The river was calm this morning.",
    "Dr. Smith arrived at 9 a.m. and left early.",
    "We visited the U.S. embassy on Friday.",
    "Prices rose by 3.5 percent last year!",
    "Is this the right way to the station?",
    'She said "hello" and walked away.',
    "The results (see Fig. 2) were clear.",
    "Wait... what happened next?",
    "Mr. and Mrs. Brown live on Elm St. near the park.",
    "It costs $4.99, e.g. less than a coffee.",
    "The NASA team launched a new probe.",
    "i think the answer is simple.",
    "Our plan works; it just needs time.",
    "They met at 5 p.m. The meeting was short.",
    "Call me at 631-481-4867 tomorrow.",
    "The museum opened in 1999. It is huge.",
    "Ask Prof. Lee about the exam.",
    "See section 4.2 for details.",
]

WORDS = ("apple garden river morning window yellow planet coffee music silver orange "
         "bridge market dinner pocket forest winter lemon candle rocket paper circle "
         "thunder pillow basket sunny quiet humble gentle bright swift").split()


def sentences(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(SENTENCES) for _ in range(count))


def words(rng: random.Random, count: int, pool=WORDS) -> str:
    """Exactly `count` \\w+ words, with word-free punctuation between some of them."""
    out = []
    for i in range(count):
        out.append(rng.choice(pool))
        out.append(rng.choice([" ", " ", " ", ", ", ". ", " - ", "! ", "\n", " ** ", " (...) "]))
    return "".join(out).strip()


def recase(rng: random.Random, text: str) -> str:
    return rng.choice([text, text.lower(), text.upper(), text.title()])


# ------------------------------------------------------------------ hand-written cases

# (instruction id, kwargs, response, expected strict verdict)
CASES = [
    # keywords
    ("keywords:existence", {"keywords": ["apple", "river"]}, "An Apple fell into the RIVER.", True),
    ("keywords:existence", {"keywords": ["apple", "river"]}, "An apple fell.", False),
    ("keywords:existence", {"keywords": ["apple", "river"]}, "Pineapples by the riverside.", True),
    ("keywords:existence", {"keywords": ["apple"]}, "   \n ", False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"}, "Cat CAT cat", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"}, "cat cat", False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"}, "concatenate cat cat", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "less than"}, "cat cat", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "less than"}, "cat cat cat", False),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "ugly"]}, "A good day.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "ugly"]}, "A BAD day.", False),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "ugly"]}, "Badly made, not uglier.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "ugly"]}, "A bad-tempered cat.", False),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "at least"}, "banana", True),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "at least"}, "bana", False),
    ("keywords:letter_frequency", {"letter": "A", "let_frequency": 3, "let_relation": "at least"}, "Aa a", True),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "less than"}, "ba", True),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "less than"}, "banana", False),
    # a non-letter "letter" (in the data; upstream draws a random letter instead)
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 4, "let_relation": "at least"}, "#a #b #c #d", True),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 4, "let_relation": "at least"}, "#a #b #c", False),
    # language
    ("language:response_language", {"language": "fr"}, LANGUAGE_TEXTS["fr"], True),
    ("language:response_language", {"language": "fr"}, LANGUAGE_TEXTS["en"], False),
    ("language:response_language", {"language": "en"}, LANGUAGE_TEXTS["en"], True),
    ("language:response_language", {"language": "hi"}, LANGUAGE_TEXTS["hi"], True),
    ("language:response_language", {"language": "hi"}, LANGUAGE_TEXTS["fr"], False),
    ("language:response_language", {"language": "hi"}, "12345 678 !!!", True),  # undetectable
    # length_constraints
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One. Two.", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One. Two. Three.", False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "One. Two. Three.", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Dr. Smith met Mr. Jones in the U.S. on Friday. They talked.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "A\n***\nB\n***\nC", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "A *** B", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "***\nA\n***\nB\n***\nC\n***", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "A\n***\n\n***\nB\n***\nC", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A ****** B", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "A\n\nB\n\nC", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two, three - four!", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "don't stop-me now", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three four", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three four 5", False),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "summary"}, "Intro.\n\nSummary, all good.\n\nEnd.", True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "summary"}, 'Intro.\n\n"Summary" is here.\n\nEnd.', True),
    ("length_constraints:nth_paragraph_first_word",  # ":" does not end the first word
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "summary"}, "Intro.\n\nSummary: all good.\n\nEnd.", False),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "summary"}, "Intro.\n\nSummary.\n\nEnd.\n\nMore.", False),
    ("length_constraints:nth_paragraph_first_word",  # an empty paragraph still has an index
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "summary"}, "Intro.\n\n\n\nSummary.\n\nEnd.", False),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "summary"}, "Intro.\nSummary.\n\nEnd.\n\nMore.", False),
    # detectable_content
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[] and [x]", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[a\nb] [c]", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\nP.S. Bye.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\np. s. bye", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nPS bye", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.P.S. bye", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S bye", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\np. p. s. bye", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.S. bye", False),
    # detectable_format
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b\n* c", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n- b\n  * c", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b\n* c\n* d", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "**Bold**\n* a\n* b\n* c", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b\n* c\n---", False),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True),
    ("detectable_format:constrained_response", {}, "Well... My answer is maybe. Because.", True),
    ("detectable_format:constrained_response", {}, "My answer is Yes.", False),
    ("detectable_format:constrained_response", {}, "my answer is no.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* only", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**bold** only", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**a** and **b**", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "*a\nb* * *", False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nA\nSECTION 2\nB", True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "Section 1\nA\nSection 2\nB", False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2}, "SECTION 1\nA", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}, "Section1 a Section2 b", True),
    ("detectable_format:json_format", {}, '{"a": 1}', True),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True),
    ("detectable_format:json_format", {}, "```JSON\n[1, 2]\n```\n", True),
    ("detectable_format:json_format", {}, '```\n{"a": 1}\n```', True),
    ("detectable_format:json_format", {}, 'Here it is: {"a": 1}', False),
    ("detectable_format:json_format", {}, '{"a": 1,}', False),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n``` done', False),
    ("detectable_format:title", {}, "<<Joy>>\nA poem.", True),
    ("detectable_format:title", {}, "<< >>\nA poem.", False),
    ("detectable_format:title", {}, "<<Joy\nful>> A poem.", False),
    ("detectable_format:title", {}, "<Joy>\nA poem.", False),
    # combination
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", True),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False),
    ("combination:two_responses", {}, "A ****** B ****** C", False),
    ("combination:two_responses", {}, "******\nA\n******\nB\n******", True),
    ("combination:two_responses", {}, "A\n******\n\n******\nB", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."}, "Write a poem about cats. Meow.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."}, "  write a POEM about cats.\nMeow", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."}, "Sure! Write a poem about cats.", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."}, "Write a poem about cats", False),
    # startend
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done.\nAny other questions?", True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?  \n", True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, '"Done. any other QUESTIONS?"', True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Thanks.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions", False),
    ("startend:quotation", {}, '"Hello"', True),
    ("startend:quotation", {}, '  "Hello"\n', True),
    ("startend:quotation", {}, '"', False),
    ("startend:quotation", {}, '"Hello', False),
    ("startend:quotation", {}, "\u201cHello\u201d", False),
    # change_case
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"}, "I LOVE NASA.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"}, "I love NASA.", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "less than"}, "I love NASA.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "less than"},
     "We met in the U.S. and the UK. OK?", False),
    ("change_case:english_capital", {}, "THIS IS ALL CAPS ENGLISH TEXT WITH 2 NUMBERS ABOUT THE WEATHER TODAY.", True),
    ("change_case:english_capital", {}, "THIS IS mostly CAPS ENGLISH TEXT.", False),
    ("change_case:english_capital", {}, LANGUAGE_TEXTS["ru"].upper(), False),
    ("change_case:english_lowercase", {}, "this is a lowercase english sentence about the weather, 2 days.", True),
    ("change_case:english_lowercase", {}, "this is Not a lowercase english sentence.", False),
    ("change_case:english_lowercase", {}, "1234", False),
    ("change_case:english_lowercase", {}, LANGUAGE_TEXTS["fr"].lower(), False),
    # punctuation
    ("punctuation:no_comma", {}, "No commas here.", True),
    ("punctuation:no_comma", {}, "One, two.", False),
    ("punctuation:no_comma", {}, "中文，逗号", True),  # a full-width comma is not ","
]

# (instruction id, kwargs, response, expected strict, expected loose)
LOOSE_CASES = [
    ("startend:quotation", {}, 'Sure, here it is:\n"Hello there"', False, True),
    ("startend:end_checker", {"end_phrase": "Peace!"}, "Bye. Peace!\n(a note)", False, True),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n```json\n{"a": 1}\n```', False, True),
    ("punctuation:no_comma", {}, "Well, yes\nbody text\nThanks, bye", False, True),
    ("change_case:english_lowercase", {}, "Title\nall of this is lowercase english text about the weather.", False, True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "**cat**\ncat", False, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b\n* c", False, True),
    ("punctuation:no_comma", {}, "a, b\nc, d\ne, f", False, False),
    ("detectable_format:title", {}, "<<T>>", True, True),
]


@pytest.mark.parametrize("instruction_id, kwargs, response, expected", CASES,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(CASES)])
def test_checker_cases(instruction_id, kwargs, response, expected):
    assert ifeval.check(instruction_id, response, kwargs) is expected


@pytest.mark.parametrize("instruction_id, kwargs, response, strict, loose", LOOSE_CASES)
def test_loose_cases(instruction_id, kwargs, response, strict, loose):
    assert ifeval.check(instruction_id, response, kwargs) is strict
    assert ifeval.check_loose(instruction_id, response, kwargs) is loose


def test_every_id_has_passing_and_failing_cases():
    verdicts = collections.defaultdict(set)
    for instruction_id, _, _, expected in CASES:
        verdicts[instruction_id].add(expected)
    assert set(verdicts) == set(ifeval.CHECKS)
    assert all(v == {True, False} for v in verdicts.values()), verdicts


def test_table_and_families():
    assert len(ifeval.CHECKS) == 25
    assert len(ifeval.FAMILIES) == 9
    assert {ifeval.family(i) for i in ifeval.CHECKS} == set(ifeval.FAMILIES)
    assert ifeval.family("keywords:existence") == "keywords"
    assert ifeval.family("detectable_format:json_format") == "detectable_format"


def test_unknown_id_and_bad_kwargs_raise():
    for call in (lambda: ifeval.check("keywords:nope", "text", {}),
                 lambda: ifeval.check_loose("keywords:nope", "text", {}),
                 lambda: ifeval.family("keywords:nope")):
        with pytest.raises(ValueError, match="keywords:nope"):
            call()
    with pytest.raises(ValueError, match="relation"):
        ifeval.check("length_constraints:number_words", "a b", {"num_words": 2, "relation": "at most"})
    with pytest.raises(TypeError, match="num_words"):
        ifeval.check("length_constraints:number_words", "a b", {"relation": "at least"})
    with pytest.raises(ValueError):
        ifeval.evaluate("text", ["punctuation:no_comma"], [])


def test_none_kwargs_are_ignored():
    kwargs = {"num_words": 2, "relation": "at least", "keywords": None, "language": None}
    assert ifeval.check("length_constraints:number_words", "a b", kwargs)
    assert ifeval.check("punctuation:no_comma", "a b", {"num_words": None})


def test_evaluate():
    response = 'Sure, here:\n"hello, world"\n'
    result = ifeval.evaluate(response, ["startend:quotation", "punctuation:no_comma", "keywords:existence"],
                             [{}, {}, {"keywords": ["world"]}])
    assert result == {"strict": [False, False, True], "loose": [True, False, True],
                      "prompt_strict": False, "prompt_loose": False}
    empty = ifeval.evaluate("  ", ["punctuation:no_comma"], [{}])
    assert empty == {"strict": [False], "loose": [False], "prompt_strict": False, "prompt_loose": False}


def test_loose_variants():
    variants = ifeval.loose_variants("first *a*\nmiddle\nlast")
    assert variants == ["first *a*\nmiddle\nlast", "middle\nlast", "first *a*\nmiddle", "middle",
                        "first a\nmiddle\nlast", "middle\nlast", "first a\nmiddle", "middle"]


def test_language_detection_is_deterministic():
    mixed = "Bonjour, my friend. Das ist gut. Ciao!"
    first = [ifeval.check("language:response_language", mixed, {"language": code}) for code in ("fr", "en", "de", "it")]
    for _ in range(5):
        assert [ifeval.check("language:response_language", mixed, {"language": code})
                for code in ("fr", "en", "de", "it")] == first


# ------------------------------------------------------------------ parity with Google's checker

# Instances left out of the parity comparison, each with its reason.
PARITY_EXCLUDED = {
    # The data asks for the "letter" "#" (key 1122) and "!" (key 1129). Upstream
    # replaces any letter outside a-z by a random one (a different verdict on
    # every run); ifeval.py counts the character asked for (tested in CASES).
    "keywords:letter_frequency with a letter outside a-z":
        lambda instruction_id, kwargs: instruction_id == "keywords:letter_frequency"
        and not (len(kwargs["letter"]) == 1 and kwargs["letter"].isascii() and kwargs["letter"].isalpha()),
}


def _wrap(rng: random.Random, text: str) -> str:
    """Put `text` in one of the envelopes models use, to exercise the loose variants."""
    return rng.choice([
        text,
        "Sure! Here is my answer:\n" + text,
        text + "\nI hope this helps!",
        "**Answer**\n" + text + "\n\n*Thanks*",
        "  \n" + text + "  \n",
        text.replace("\n", "\n\n"),
        "# Heading\n" + text + "\n---",
        text.replace("\n", "\r\n"),
    ])


def _random_document(rng: random.Random) -> str:
    """A response assembled from random markdown and multilingual pieces."""
    pieces = [
        "<<" + rng.choice(WORDS).title() + " " + rng.choice(WORDS) + ">>",
        "\n".join(rng.choice(["* ", "- ", "  * "]) + rng.choice(SENTENCES) for _ in range(rng.randint(1, 4))),
        "\n".join(f"SECTION {i + 1}\n{rng.choice(SENTENCES)}" for i in range(rng.randint(1, 3))),
        rng.choice(["***", "******", "---", "* * *"]),
        "*" + rng.choice(WORDS) + "* and **" + rng.choice(WORDS) + "**",
        "```json\n" + json.dumps({rng.choice(WORDS): rng.randint(0, 9)}) + "\n```",
        "Dear [name], your order [order id] ships soon.",
        rng.choice(["P.S.", "P.P.S", "p.s."]) + " " + rng.choice(SENTENCES),
        '"' + rng.choice(SENTENCES) + '"',
        sentences(rng, 2).upper(),
        sentences(rng, 2).lower(),
        LANGUAGE_TEXTS[rng.choice(sorted(LANGUAGE_TEXTS))],
        rng.choice(["My answer is yes.", "My answer is no.", "My answer is maybe."]),
        sentences(rng, rng.randint(1, 6)),
        "\n\n".join(sentences(rng, 1) for _ in range(rng.randint(2, 4))),
    ]
    document = "\n".join(rng.sample(pieces, rng.randint(1, 5)))
    return rng.choice([document, document, document.upper(), document.lower(), '"' + document + '"',
                       document.replace(",", "")])


def _counts(n: int) -> list[int]:
    return sorted({max(n - 1, 0), n, n + 1})


def _gen_existence(rng, kw):
    keywords = kw["keywords"]
    base = sentences(rng, 3).split()
    def insert(items):
        text = list(base)
        for item in items:
            text.insert(rng.randrange(len(text) + 1), recase(rng, item))
        return " ".join(text)
    return [insert(keywords), insert(keywords[:-1]), insert([k + "s" for k in keywords]),
            " ".join(keywords) + "\n" + sentences(rng, 2), sentences(rng, 2)]


def _gen_frequency(rng, kw):
    keyword, frequency = kw["keyword"], kw["frequency"]
    out = []
    for n in _counts(frequency):
        parts = [sentences(rng, 1) for _ in range(n + 1)]
        out.append(" ".join(p + " " + recase(rng, keyword) for p in parts[:n]) + " " + parts[-1])
    out.append(recase(rng, keyword) + " first line\n" + (" " + keyword + " and") * (frequency - 1) + " end.")
    out.append(sentences(rng, 2) + " un" + keyword + "ed " + keyword + "s")
    return out


def _gen_forbidden(rng, kw):
    word = rng.choice(kw["forbidden_words"])
    text = sentences(rng, 3)
    return [text, text + " " + recase(rng, word) + ".", text + " un" + word + "ness",
            "(" + word + ")\n" + text, text + " " + word + "-like", text + " " + word + "s"]


def _gen_letter(rng, kw):
    letter, frequency = kw["letter"].lower(), kw["let_frequency"]
    pool = [w for w in WORDS if letter not in w] or ["xyz"]
    out = []
    for n in _counts(frequency):
        tokens = words(rng, 12, pool).split(" ")
        for _ in range(n):
            tokens.insert(rng.randrange(len(tokens) + 1), rng.choice([letter, letter.upper()]))
        out.append(" ".join(tokens))
    out.append(letter.upper() * frequency + "\n" + words(rng, 5, pool))
    return out


def _gen_language(rng, kw):
    language = kw["language"]
    own = LANGUAGE_TEXTS.get(language, LANGUAGE_TEXTS["fr"])
    other = LANGUAGE_TEXTS[rng.choice([code for code in LANGUAGE_TEXTS if code != language])]
    return [own, LANGUAGE_TEXTS["en"], own + "\n" + LANGUAGE_TEXTS["en"], "* " + own.replace(". ", ".\n* "),
            "Translation:\n" + own, other, "12345 678", own.split(" ")[0]]


def _gen_sentences(rng, kw):
    n = kw["num_sentences"]
    out = [sentences(rng, k) for k in _counts(n)]
    out.append("\n".join("* " + rng.choice(SENTENCES) for _ in range(n)))
    out.append(sentences(rng, n).replace(".", ""))
    return out


def _gen_paragraphs(rng, kw):
    n = kw["num_paragraphs"]
    out = []
    for k in _counts(n):
        separator = rng.choice(["\n***\n", "\n\n***\n\n", " *** ", "***"])
        out.append(separator.join(sentences(rng, 2) for _ in range(k)))
    body = ["P%d. %s" % (i, sentences(rng, 1)) for i in range(n)]
    out.append("***\n" + "\n***\n".join(body) + "\n***")
    out.append("\n***\n".join(body[:1] + [""] + body[1:]))
    out.append("\n\n".join(body))
    out.append("\n******\n".join(body))
    return out


def _gen_words(rng, kw):
    n = kw["num_words"]
    out = [words(rng, k) for k in _counts(n)]
    out.append(words(rng, n - 2) + " don't")
    out.append("Title line here\n" + words(rng, n - 1))
    # Devanagari words: \w+ splits them at vowel signs under `re`, not under `regex`
    out.append(" ".join(rng.choice(LANGUAGE_TEXTS["hi"].split()) for _ in range(n - 1)))
    return out


def _gen_nth_paragraph(rng, kw):
    total, nth, word = kw["num_paragraphs"], kw["nth_paragraph"], kw["first_word"]
    def doc(count, start, separator="\n\n"):
        paragraphs = [sentences(rng, 2) for _ in range(count)]
        if nth <= count:
            paragraphs[nth - 1] = start + " " + paragraphs[nth - 1]
        return separator.join(paragraphs)
    return [doc(total, word), doc(total, word.title() + ","), doc(total, '"' + word.upper() + '"'),
            doc(total, word + ":"), doc(total, "'" + word + "."), doc(total + 1, word), doc(total - 1, word),
            doc(total, word, "\n\n\n\n"), doc(total, "Then"), doc(total, word, "\n"),
            "Intro line\n" + doc(total, word), doc(total, word) + "\n\n"]


def _gen_placeholders(rng, kw):
    n = kw["num_placeholders"]
    out = []
    for k in _counts(n):
        slots = [rng.choice(["[name]", "[address]", "[ ]", "[]", "[date of birth]", "[[x]]"]) for _ in range(k)]
        out.append(" ".join(sentences(rng, 1) + " " + slot for slot in slots) + " End.")
    out.append("[broken\nplaceholder] " + "[x] " * (n - 1))
    return out


def _gen_postscript(rng, kw):
    body = sentences(rng, 2)
    markers = ["P.S.", "p.s.", "P. S.", "PS", "P.P.S", "P.P.S.", "p. p. s", "P.S", "PPS", "Postscript:"]
    return [body + "\n\n" + marker + " " + sentences(rng, 1) for marker in markers] + [body]


def _gen_bullets(rng, kw):
    n = kw["num_bullets"]
    out = []
    for k in _counts(n):
        bullets = [rng.choice(["* ", "- ", "  * ", "*\t", "-"]) + rng.choice(SENTENCES) for _ in range(k)]
        out.append(rng.choice(["", "**Plan**\n", "Intro:\n"]) + "\n".join(bullets)
                   + rng.choice(["", "\n---", "\n*Note* that", "\n\n**Done**"]))
    out.append("\n".join("1. " + rng.choice(SENTENCES) for _ in range(n)))
    out.append("\n".join("** " + rng.choice(SENTENCES) for _ in range(n)))
    return out


def _gen_constrained(rng, kw):
    return ["My answer is yes.", "My answer is no", "My answer is maybe. " + sentences(rng, 1),
            "I think... My answer is no.", "MY ANSWER IS YES.", "my answer is maybe.", sentences(rng, 2),
            "My answer is yes!", "**My answer is no.**"]


def _gen_highlights(rng, kw):
    n = kw["num_highlights"]
    out = []
    for k in _counts(n):
        spans = [rng.choice(["*%s*", "**%s**", "* %s *", "*%s*"]) % rng.choice(WORDS) for _ in range(k)]
        out.append(" ".join(sentences(rng, 1) + " " + span for span in spans))
    out.append("*multi\nline* " + "* * " * n)
    out.append("\n".join("* " + w for w in WORDS[:n]))
    return out


def _gen_sections(rng, kw):
    splitter, n = kw["section_spliter"], kw["num_sections"]
    out = []
    for k in _counts(n):
        out.append("\n".join(f"{splitter} {i + 1}\n{sentences(rng, 1)}" for i in range(k)))
    out.append("\n".join(f"{splitter.lower()} {i + 1}\n{sentences(rng, 1)}" for i in range(n)))
    out.append("\n".join(f"{splitter}{i + 1}: {sentences(rng, 1)}" for i in range(n)))
    out.append("\n".join(f"## {splitter} {['One', 'Two', 'Three'][i % 3]}\n{sentences(rng, 1)}" for i in range(n)))
    return out


def _gen_json(rng, kw):
    payload = json.dumps({"title": rng.choice(WORDS), "items": [rng.choice(WORDS) for _ in range(3)]}, indent=2)
    return [payload, "```json\n" + payload + "\n```", "```JSON\n" + payload + "\n```", "```\n" + payload + "\n```",
            "```Json " + payload + "```", "Here you go:\n```json\n" + payload + "\n```", payload[:-1],
            payload + "\nHope this helps!", "```python\n" + payload + "\n```", '"just a string"']


def _gen_title(rng, kw):
    body = sentences(rng, 2)
    return ["<<" + rng.choice(WORDS).title() + ">>\n" + body, "<< >>\n" + body, "<<multi\nline>>\n" + body,
            "<" + rng.choice(WORDS) + ">\n" + body, body + " <<end title>>", "<<<x>>>", body]


def _gen_two_responses(rng, kw):
    a, b = sentences(rng, 2), sentences(rng, 2)
    return [a + "\n******\n" + b, a + "\n******\n" + a, a + "******" + b + "******" + a,
            "******\n" + a + "\n******\n" + b + "\n******", a + "\n******\n\n******\n" + b,
            a + "\n*******\n" + b, a + "\n***\n" + b]


def _gen_repeat(rng, kw):
    prompt = kw["prompt_to_repeat"]
    answer = sentences(rng, 2)
    return [prompt + "\n" + answer, prompt.upper() + " " + answer, "  \n" + prompt + answer,
            "Sure!\n" + prompt + "\n" + answer, prompt[:-5] + "\n" + answer, answer,
            prompt.replace(" ", "  ", 1) + "\n" + answer, '"' + prompt + '"\n' + answer]


def _gen_end(rng, kw):
    phrase = kw["end_phrase"]
    body = sentences(rng, 2)
    return [body + " " + phrase, body + "\n" + phrase + "  \n", '"' + body + " " + phrase + '"',
            body + " " + phrase.upper(), body + " " + phrase + " Thanks.", body + " " + phrase[:-1],
            body + " " + phrase + "\n\nP.S. " + sentences(rng, 1), body + " " + phrase + "**", body]


def _gen_quotation(rng, kw):
    body = sentences(rng, 2)
    return ['"' + body + '"', '  "' + body + '"\n', '"', '""', body, '"' + body, "\u201c" + body + "\u201d",
            'Here:\n"' + body + '"', '"' + body + '"\n(quoted)', "'" + body + "'"]


def _gen_capital(rng, kw):
    n = kw["capital_frequency"]
    out = []
    for k in _counts(n):
        tokens = sentences(rng, 2).lower().split()
        for _ in range(k):
            tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(["NASA", "OK", "BIG", "USA", "AI", "WOW!"]))
        out.append(" ".join(tokens))
    out.append(sentences(rng, n))
    out.append(" ".join(["I", "A", "U.S.", "NASA's", "COVID-19", "A1", "HELLO,", "**BOLD**"] * max(1, n // 4)))
    # word_tokenize splits these: "NASA's" -> NASA 's (one capital word), "DON'T" -> DO N'T (two)
    out.append("we saw " + "NASA " * (n - 1) + "and NASA's probe.")
    out.append("we " + "SAW " * (n - 2) + "and DON'T stop.")
    return out


def _gen_english_capital(rng, kw):
    english = sentences(rng, 3)
    return [english.upper(), english, english.upper()[:-1] + "x", LANGUAGE_TEXTS["de"].upper(),
            "Note:\n" + english.upper(), "123 456", english.upper() + "\n" + LANGUAGE_TEXTS["ru"].upper()]


def _gen_english_lowercase(rng, kw):
    english = sentences(rng, 3)
    return [english.lower(), english, "Title\n" + english.lower(), LANGUAGE_TEXTS["it"].lower(),
            "123 456", english.lower() + " I"]


def _gen_no_comma(rng, kw):
    body = sentences(rng, 3).replace(",", "")
    return [body, body + ", yes.", "Well, hi\n" + body, body + "\nBye, now", "中文，逗号 " + body, "\n,\n"]


GENERATORS = {
    "keywords:existence": _gen_existence,
    "keywords:frequency": _gen_frequency,
    "keywords:forbidden_words": _gen_forbidden,
    "keywords:letter_frequency": _gen_letter,
    "language:response_language": _gen_language,
    "length_constraints:number_sentences": _gen_sentences,
    "length_constraints:number_paragraphs": _gen_paragraphs,
    "length_constraints:number_words": _gen_words,
    "length_constraints:nth_paragraph_first_word": _gen_nth_paragraph,
    "detectable_content:number_placeholders": _gen_placeholders,
    "detectable_content:postscript": _gen_postscript,
    "detectable_format:number_bullet_lists": _gen_bullets,
    "detectable_format:constrained_response": _gen_constrained,
    "detectable_format:number_highlighted_sections": _gen_highlights,
    "detectable_format:multiple_sections": _gen_sections,
    "detectable_format:json_format": _gen_json,
    "detectable_format:title": _gen_title,
    "combination:two_responses": _gen_two_responses,
    "combination:repeat_prompt": _gen_repeat,
    "startend:end_checker": _gen_end,
    "startend:quotation": _gen_quotation,
    "change_case:capital_word_frequency": _gen_capital,
    "change_case:english_capital": _gen_english_capital,
    "change_case:english_lowercase": _gen_english_lowercase,
    "punctuation:no_comma": _gen_no_comma,
}


def _records(reference) -> list[dict]:
    """The prompts of Google's input_data.jsonl and, when present, the paper's sys_ifeval.jsonl."""
    paths = [reference.input_data] + ([SYS_IFEVAL] if SYS_IFEVAL.exists() else [])
    return [json.loads(line) for path in paths for line in path.read_text(encoding="utf-8").splitlines()]


def _instances(records) -> list[tuple[str, dict]]:
    """Unique (instruction id, kwargs) pairs from the data, plus each counted one with
    the other relation, so that "less than" and "at least" both meet every threshold."""
    seen, out = set(), []
    flip = {"less than": "at least", "at least": "less than"}
    for record in records:
        for instruction_id, kwargs in zip(record["instruction_id_list"], record["kwargs"]):
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            variants = [kwargs]
            for key in ("relation", "let_relation", "capital_relation"):
                if key in kwargs:
                    variants.append({**kwargs, key: flip[kwargs[key]]})
            for variant in variants:
                key = (instruction_id, json.dumps(variant, sort_keys=True))
                if key not in seen:
                    seen.add(key)
                    out.append((instruction_id, variant))
    return out


def _excluded(instruction_id, kwargs) -> str | None:
    return next((reason for reason, test in PARITY_EXCLUDED.items() if test(instruction_id, kwargs)), None)


def build_parity_set(reference, seed: int = 0):
    """[(instruction id, kwargs, response)] and [(record, response)] to compare on."""
    rng = random.Random(seed)
    records = _records(reference)
    instances = [(i, kw) for i, kw in _instances(records) if not _excluded(i, kw)]
    per_id = collections.Counter(instruction_id for instruction_id, _ in instances)
    pairs = []
    for instruction_id, kwargs in instances:
        rounds = max(1, 6 // per_id[instruction_id])  # more rounds for ids with few instances
        responses = [r for _ in range(rounds) for r in GENERATORS[instruction_id](rng, kwargs)]
        responses += [_wrap(rng, rng.choice(responses)) for _ in range(2 * rounds)]
        responses += [_random_document(rng) for _ in range(2 * rounds)]
        pairs += [(instruction_id, kwargs, response) for response in responses]
    # every hand-written case too
    pairs += [(i, kw, r) for i, kw, r, _ in CASES if not _excluded(i, kw)]
    pairs += [(i, kw, r) for i, kw, r, _, _ in LOOSE_CASES]
    # whole prompts: a response built for one of the prompt's instructions, scored on all
    prompts = []
    for record in rng.sample(records, 200):
        ids, kwargs_list = record["instruction_id_list"], record["kwargs"]
        if any(_excluded(i, kw) for i, kw in zip(ids, kwargs_list)):
            continue
        index = rng.randrange(len(ids))
        response = _wrap(rng, rng.choice(GENERATORS[ids[index]](rng, kwargs_list[index])))
        prompts.append((record, response))
    return pairs, prompts


@pytest.fixture(scope="module")
def reference():
    try:
        return ifeval_reference.load()
    except ifeval_reference.Unavailable as reason:
        pytest.skip(f"Google's IFEval checker unavailable: {reason}")


def compare(reference, pairs) -> list[dict]:
    """Both checkers' strict and loose verdicts on every (instruction id, kwargs, response)."""
    return [{"id": instruction_id, "kwargs": kwargs, "response": response,
             "strict": ifeval.check(instruction_id, response, kwargs),
             "loose": ifeval.check_loose(instruction_id, response, kwargs),
             "ref_strict": reference.strict(response, [instruction_id], [kwargs])[0],
             "ref_loose": reference.loose(response, [instruction_id], [kwargs])[0]}
            for instruction_id, kwargs, response in pairs]


@pytest.fixture(scope="module")
def parity(reference):
    pairs, prompts = build_parity_set(reference)
    return compare(reference, pairs), prompts


def parity_report(rows) -> str:
    table = collections.defaultdict(lambda: collections.Counter())
    for row in rows:
        for name in (row["id"], "overall"):
            counts = table[name]
            counts["n"] += 1
            counts["strict"] += row["strict"] == row["ref_strict"]
            counts["loose"] += row["loose"] == row["ref_loose"]
            counts["passes"] += row["ref_strict"]
            counts["loose_only"] += row["ref_loose"] and not row["ref_strict"]
    lines = [f"{'instruction id':48} {'n':>5} {'strict':>8} {'loose':>8} {'pass %':>7} {'loose-only':>10}"]
    for name in sorted(table, key=lambda n: (n == "overall", n)):
        c = table[name]
        lines.append(f"{name:48} {c['n']:5d} {c['strict'] / c['n']:8.2%} {c['loose'] / c['n']:8.2%} "
                     f"{c['passes'] / c['n']:7.1%} {c['loose_only']:10d}")
    responses = len({row["response"] for row in rows})
    lines.append(f"{responses} distinct responses, {len(rows)} (response, instruction) pairs")
    return "\n".join(lines)


def test_reference_has_the_same_ids(reference):
    assert reference.instruction_ids == sorted(ifeval.CHECKS)


def test_parity_set_covers_every_id_both_ways(parity):
    rows, prompts = parity
    assert len({row["response"] for row in rows}) >= 500
    assert len(prompts) >= 150
    by_id = collections.defaultdict(set)
    for row in rows:
        by_id[row["id"]].add(row["ref_strict"])
    assert set(by_id) == set(ifeval.CHECKS)
    assert all(verdicts == {True, False} for verdicts in by_id.values()), by_id
    assert sum(row["ref_loose"] and not row["ref_strict"] for row in rows) >= 100


def test_parity_with_google_instruction_level(parity):
    rows, _ = parity
    print("\n" + parity_report(rows))
    disagreements = [(row["id"], row["kwargs"], row["response"][:200], row["strict"], row["ref_strict"],
                      row["loose"], row["ref_loose"])
                     for row in rows if (row["strict"], row["loose"]) != (row["ref_strict"], row["ref_loose"])]
    assert disagreements == []


def test_parity_with_google_prompt_level(parity, reference):
    _, prompts = parity
    for record, response in prompts:
        ids, kwargs_list = record["instruction_id_list"], record["kwargs"]
        ours = ifeval.evaluate(response, ids, kwargs_list)
        assert ours["strict"] == reference.strict(response, ids, kwargs_list), (record["key"], response)
        assert ours["loose"] == reference.loose(response, ids, kwargs_list), (record["key"], response)
        assert ours["prompt_strict"] == all(ours["strict"])
        assert ours["prompt_loose"] == all(ours["loose"])


def test_tokenizers_match_nltk(reference):
    """ifeval.py builds Punkt in memory; NLTK itself reads the punkt_tab files the
    reference loader wrote. Both must split the same way."""
    import nltk

    texts = SENTENCES + [" ".join(SENTENCES), "\n\n".join(SENTENCES[::-1]), "no punctuation at all",
                         "U.S.A. is big. e.g. this one... Right?! 'Quoted.' Next"]
    for text in texts:
        assert ifeval.split_sentences(text) == nltk.sent_tokenize(text)
        assert ifeval.split_words(text) == nltk.word_tokenize(text)


# ------------------------------------------------------------------ kwargs validation (when data is loaded)

@pytest.mark.parametrize("instruction_id, kwargs, message", [
    ("keywords:existence", {"bogus_kwarg": 3}, "keywords:existence does not take the kwarg(s) 'bogus_kwarg'; "
                                                "it takes keywords"),
    ("punctuation:no_comma", {"num_words": 3}, "punctuation:no_comma does not take the kwarg(s) 'num_words'; "
                                                "it takes none"),
    ("length_constraints:number_words", {"num_words": 3},
     "length_constraints:number_words needs the kwarg(s) 'relation'; it takes num_words, relation"),
    ("keywords:existence", {"keywords": "abc"}, "keywords:existence: kwarg 'keywords' is 'abc', not of type list[str]"),
    ("length_constraints:number_words", {"num_words": "3", "relation": "at least"},
     "length_constraints:number_words: kwarg 'num_words' is '3', not of type int"),
    ("startend:end_checker", {"end_phrase": True}, "startend:end_checker: kwarg 'end_phrase' is True, not of type str"),
    ("keywords:forbidden_words", {"forbidden_words": ["ok", "a("]},
     "keywords:forbidden_words: kwarg 'forbidden_words' holds 'a(', which is not a valid regular expression"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at most"},
     "length_constraints:number_words: kwargs {'num_words': 3, 'relation': 'at most'} do not work: relation must be"),
    ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 2, "let_relation": "at least"},
     "do not work: letter must be a single character, got 'ab'"),
    ("keywords:nope", {}, "unknown IFEval instruction id: 'keywords:nope'"),
])
def test_validate_kwargs_refuses_what_check_cannot_run(instruction_id, kwargs, message):
    with pytest.raises(ValueError) as error:
        ifeval.validate_kwargs(instruction_id, kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_validate_kwargs_accepts_what_check_runs_on():
    # None values are ignored, as check() ignores them (Hugging Face's copy of the data fills every key with None)
    ifeval.validate_kwargs("punctuation:no_comma", {"num_words": None, "keywords": None})
    ifeval.validate_kwargs("length_constraints:number_words", {"num_words": 3, "relation": "less than", "x": None})
    for instruction_id, kwargs, response, _ in CASES:
        ifeval.validate_kwargs(instruction_id, kwargs)
        ifeval.check(instruction_id, response, kwargs)


def test_validate_kwargs_matches_google_signatures_and_data(reference):
    """Our kwarg names are Google's, and every record of Google's and the paper's data passes validation."""
    import importlib
    import inspect

    registry = importlib.import_module(ifeval_reference.PACKAGE + ".instructions_registry")
    for instruction_id, checker in ifeval.CHECKS.items():
        theirs = set(inspect.signature(registry.INSTRUCTION_DICT[instruction_id].build_description).parameters)
        ours = {name for name, p in inspect.signature(checker).parameters.items() if p.kind == p.KEYWORD_ONLY}
        assert ours == theirs - {"self"}, instruction_id
    records = _records(reference)
    assert len(records) >= 541
    for record in records:
        for instruction_id, kwargs in zip(record["instruction_id_list"], record["kwargs"]):
            ifeval.validate_kwargs(instruction_id, kwargs)


# ------------------------------------------------------------------ regex kwargs are plain text

SLOW_PATTERN = "(.*)*QQQ"  # exponential: about 1 s on 22 characters, four times longer for each 2 more


@pytest.mark.parametrize("instruction_id, kwargs, name, shown", [
    ("keywords:existence", {"keywords": ["fine", SLOW_PATTERN]}, "keywords", SLOW_PATTERN),
    ("keywords:frequency", {"keyword": "(a|aa)*b", "frequency": 2, "relation": "at least"}, "keyword", "(a|aa)*b"),
    ("keywords:forbidden_words", {"forbidden_words": ["x+y"]}, "forbidden_words", "x+y"),
    ("keywords:forbidden_words", {"forbidden_words": ["a.b"]}, "forbidden_words", "a.b"),  # periods: markers only
    ("detectable_format:multiple_sections", {"section_spliter": "S(.*)*", "num_sections": 2}, "section_spliter",
     "S(.*)*"),
    ("detectable_content:postscript", {"postscript_marker": "(P.)*S"}, "postscript_marker", "(P.)*S"),
])
def test_regex_kwargs_must_be_plain_text(instruction_id, kwargs, name, shown):
    """Google's checker searches these kwargs as regular expressions, so a pattern like (.*)*QQQ would hang the
    scoring of a response after all generation: refused when data is loaded, in one line naming the kwarg."""
    with pytest.raises(ValueError) as error:
        ifeval.validate_kwargs(instruction_id, kwargs)
    message = str(error.value)
    assert message.startswith(f"{instruction_id}: kwarg {name!r} holds {shown!r}, which is not plain text (it has ")
    assert "\n" not in message


def test_check_refuses_a_slow_pattern_instead_of_running_it(monkeypatch):
    """A prompt made in code, past the loaders: check() refuses the pattern before searching the response
    (re.search of the pattern, which the checker would run, fails the test if it is ever called)."""
    searched = []
    search = re.search

    def guarded(pattern, *args, **kwargs):
        if pattern == SLOW_PATTERN:
            searched.append(pattern)
            raise AssertionError(f"searched {pattern!r}: the refusal must come before the checker")
        return search(pattern, *args, **kwargs)

    monkeypatch.setattr(re, "search", guarded)
    with pytest.raises(AssertionError, match="searched"):                      # the guard sees the checker's search
        ifeval.CHECKS["keywords:existence"]("x" * 22, keywords=[SLOW_PATTERN])
    searched.clear()
    with pytest.raises(ValueError, match=r"kwarg 'keywords' holds '\(\.\*\)\*QQQ', which is not plain text"):
        ifeval.check("keywords:existence", "x" * 22, {"keywords": [SLOW_PATTERN]})  # unchecked: ~1 s, then False
    assert searched == []


def test_plain_text_kwargs_pass():
    """Letters and marks of any script, digits, spaces, hyphens and apostrophes (straight or curly); periods in a
    postscript marker. Each searches, as a regex, exactly what it searches as a literal."""
    words = ["state-of-the-art", "don't", "it\u2019s", "caf\u00e9", "\u092c\u0948\u0920\u0915", "2024", "New York"]
    ifeval.validate_kwargs("keywords:existence", {"keywords": words})
    ifeval.validate_kwargs("keywords:forbidden_words", {"forbidden_words": words})
    for marker in ("P.S.", "P.P.S", "Note", "P.S"):
        ifeval.validate_kwargs("detectable_content:postscript", {"postscript_marker": marker})
    text = "A caf\u00e9 in New York, state-of-the-art since 2024; don't \u092c\u0948\u0920\u0915 it\u2019s"
    for word in words:
        assert ifeval.check("keywords:existence", text, {"keywords": [word]})
        assert ifeval.check("keywords:existence", text.replace(word, "?"), {"keywords": [word]}) is False


def test_real_data_regex_kwargs_are_plain_text(reference):
    """What Google's 541 prompts and the paper's 539 hold in the regex kwargs passes the plain-text rule (so the
    rule changes no verdict on real data; the parity tests above check the verdicts)."""
    seen = collections.Counter()
    for record in _records(reference):
        for instruction_id, kwargs in zip(record["instruction_id_list"], record["kwargs"]):
            given = {key: value for key, value in kwargs.items() if value is not None}
            ifeval.validate_kwargs(instruction_id, given)
            seen.update(name for name in ifeval.REGEX_KWARGS if name in given)
    assert set(seen) == set(ifeval.REGEX_KWARGS) and sum(seen.values()) > 150  # 339 with both files


if __name__ == "__main__":
    print(parity_report(compare(ifeval_reference.load(), build_parity_set(ifeval_reference.load())[0])))
