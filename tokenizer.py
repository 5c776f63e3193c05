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
"""
import json
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The GPT-2 pre-tokenizer regex, used by ByteLevel(use_regex=true).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CONTENT_MARK = "\ue000{}\ue001"  # private-use characters: stand-ins for message contents while rendering


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
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
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

    def encode(self, text: str, at_start: bool = True) -> list[int]:
        ids = self.encoding.encode_ordinary(self.normalize(text))
        return ids if self.encoding.max_token_value < self.vocab_size else [i for i in ids if i < self.vocab_size]

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        return [self.encoding.decode_single_token_bytes(i) for i in ids]

    def decode(self, ids: list[int], at_start: bool = True) -> str:
        return self.encoding.decode_bytes(ids).decode("utf-8", errors="replace")


class _SentencePiece:
    """A sentencepiece tokenizer.model. Text at the start gets sentencepiece's dummy-prefix space; text
    after a special token gets it too in HF's "legacy" mode (Llama-2), not otherwise (Mistral v0.3)."""

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

    def encode(self, text: str, at_start: bool = True) -> list[int]:
        return (self.sp if at_start or self.legacy else self.plain).encode(text)

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
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); regenerate or re-download it") from None


@lru_cache
def _compile_chat_template(source: str) -> jinja2.Template:
    """A Jinja chat template compiled as transformers compiles it."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # HF's: no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Text <-> ids for one checkpoint, and its chat template. Made by `load_tokenizer`."""

    def __init__(self, backend, special_tokens: dict[str, int], config: dict, chat_template: str | None, where: str):
        self.backend, self.where = backend, where
        self.special_tokens = dict(special_tokens)
        self.special_names = {i: token for token, i in self.special_tokens.items()}
        self.vocab_size = max([backend.vocab_size, *(i + 1 for i in self.special_names)])
        names = ("bos_token", "eos_token", "unk_token", "pad_token")  # what HF hands the template
        self.template_vars = {name: _token_text(config[name]) for name in names if _token_text(config.get(name))}
        self.bos_token, self.eos_token = self.template_vars.get("bos_token"), self.template_vars.get("eos_token")
        self.bos_id, self.eos_id = self.special_tokens.get(self.bos_token), self.special_tokens.get(self.eos_token)
        self.chat_template = chat_template
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self.special_regex = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")

    def encode(self, text: str) -> list[int]:
        """Ids of user text: special-token strings stay text, no BOS is added."""
        return self.backend.encode(text)

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

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat as text, rendered like transformers' apply_chat_template."""
        if self.chat_template is None:
            raise ValueError(f"{self.where} has no chat template (tokenizer_config.json 'chat_template' "
                             "or chat_template.jinja); add one to the checkpoint folder")
        messages = [{key: value for key, value in m.items() if value is not None} for m in messages]  # as HF does
        try:
            template = _compile_chat_template(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                   documents=None, **self.template_vars)
        except jinja2.TemplateError as err:  # a syntax error, or the template's own raise_exception
            raise ValueError(f"chat template of {self.where} failed: {err}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool) -> ChatEncoding:
        """Render and encode a chat; special tokens are recognised only outside the message contents."""
        text, content_ranges, spans, leads = self._locate_contents(messages, add_generation_prompt)
        specials, gap_start = [], 0
        for gap_end, next_start in [*content_ranges, (len(text), len(text))]:
            specials += self.special_regex.finditer(text, gap_start, gap_end)
            gap_start = next_start
        ids, offsets, cursor = [], [], 0
        for piece in [*specials, None]:
            end = piece.start() if piece else len(text)
            if end > cursor:  # template text and contents between two special tokens: one piece, as HF does
                piece_ids = self.backend.encode(text[cursor:end], at_start=cursor == 0)
                ids += piece_ids
                offsets += _char_offsets(text[cursor:end], self.backend.token_bytes(piece_ids), cursor)
            if piece:
                ids.append(self.special_tokens[piece.group()])
                offsets.append(piece.span())
                cursor = piece.end()
        return ChatEncoding(ids, text, offsets, spans, leads)

    def _locate_contents(self, messages: list[dict], add_generation_prompt: bool):
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
        text = self.render_chat(messages, add_generation_prompt)
        skeleton = self.render_chat([{**m, "content": CONTENT_MARK.format(i)} for i, m in enumerate(messages)],
                                    add_generation_prompt)
        pattern, owners, position = [], [], 0
        for mark in re.finditer(CONTENT_MARK.format(r"(\d+)"), skeleton):
            content = messages[int(mark.group(1))]["content"]
            variants = dict.fromkeys([content, content.strip(), content.lstrip(), content.rstrip()])
            pattern += [re.escape(skeleton[position:mark.start()]), "(" + "|".join(map(re.escape, variants)) + ")"]
            owners.append(int(mark.group(1)))
            position = mark.end()
        if absent := sorted(set(range(len(messages))) - set(owners)):
            raise ValueError(f"the chat template of {self.where} does not render the content of message(s) {absent} "
                             "(it drops them or folds them into another message)")
        found = re.fullmatch("".join(pattern) + re.escape(skeleton[position:]), text, flags=re.DOTALL)
        if found is None:
            raise ValueError(f"the chat template of {self.where} changes message contents beyond trimming, so "
                             "nanokv cannot tell its text from user text; refusing to guess where special tokens are")
        content_ranges = [found.span(group) for group in range(1, len(owners) + 1)]
        spans, leads = {}, {}
        for owner, (start, end) in zip(owners, content_ranges):
            if owner not in spans:
                content, rendered = messages[owner]["content"], text[start:end]
                spans[owner], leads[owner] = (start, end), content.find(rendered) if rendered else 0
        order = range(len(messages))
        return text, content_ranges, [spans[i] for i in order], [leads[i] for i in order]

    def chat_ids(self, system: str, user: str) -> tuple[ChatEncoding, ChatEncoding]:
        """(the system turn alone, no generation prompt; system + user with the generation prompt).
        The first's ids are a prefix of the second's, so a cache prefilled with the system turn can be reused."""
        system_turn = [{"role": "system", "content": system}]
        problem = (f"the chat template of {self.where} does not render the system turn as a prefix of the "
                   "conversation (it folds the system message into the user turn, like Mistral's)")
        try:
            head = self.encode_chat(system_turn, add_generation_prompt=False)
        except ValueError as err:
            raise ValueError(f"{problem}: {err}") from None
        whole = self.encode_chat(system_turn + [{"role": "user", "content": user}], add_generation_prompt=True)
        if whole.ids[:len(head.ids)] != head.ids:
            raise ValueError(problem)
        return head, whole


def load_tokenizer(folder) -> Tokenizer:
    """The tokenizer of a Hugging Face checkpoint folder (see the module docstring for what is read)."""
    folder = Path(folder)
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
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    if (folder / "chat_template.jinja").exists():  # newer checkpoints keep it in its own file
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return Tokenizer(backend, special_tokens, config, template, str(folder))
