"""The tokenizer and chat template of a pretrained chat model, from a GGUF file or an HF directory.

:class:`ChatTokenizer` wraps a ``tokenizers.Tokenizer`` and the model's Jinja chat template.
The runtime never renders a whole conversation per turn: it appends the text of one message at
a time (:meth:`ChatTokenizer.turn_text`), opens the reply with
:meth:`ChatTokenizer.generation_prefix`, stops on :attr:`ChatTokenizer.end_ids` and then appends
:attr:`ChatTokenizer.after_end_text`. Those pieces are *derived from the template* by rendering
it twice and taking the difference, so they are exactly what ``transformers``'
``apply_chat_template`` would produce for the whole conversation, whatever the template.

A GGUF carries no ``tokenizer.json``, only llama.cpp's description of it (vocabulary, merges,
token types and the name of a pre-tokenizer, ``tokenizer.ggml.pre``).
:meth:`ChatTokenizer.from_gguf_metadata` rebuilds the Hugging Face tokenizer that the name
stands for; :meth:`ChatTokenizer.save` writes it out so the converted directory loads with
:meth:`ChatTokenizer.from_dir` (and with ``transformers.AutoTokenizer``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from agent_runtime.errors import CheckpointError
from agent_runtime.files import atomic_write

__all__ = [
    "CHAT_TEMPLATE_FILE",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "ChatTokenizer",
    "TextStream",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves the template
_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"  # older repos name bos/eos only here

# The special tokens a template may read, as transformers passes them to it.
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_GGUF_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
# llama.cpp's token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer regexes of the Hugging Face tokenizer.json files that llama.cpp's
# ``tokenizer.ggml.pre`` names stand for (llama.cpp's llama-vocab.cpp lists the same splits).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt-2", "gpt2", "mpt", "olmo", "phi-2")
# GPT-2's regex after splitting off every digit (SmolLM2's tokenizer.json: Digits + ByteLevel).
_DIGITS_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen", "stablelm2")

# A message content no template changes (no surrounding blanks to trim, no markup).
_PROBE = "AgentRuntimeProbeContent"
_PROBE_CONTEXT = {"system": "S.", "user": "Hi.", "assistant": "Hello."}
# Conversations tried, in order, before a message of a given role that is not the first: the
# first one the template accepts (e.g. Llama 2's requires user/assistant alternation) is used.
_CONTEXTS = (("user", "assistant"), ("user",), ("system",))


class TextStream:
    """Turns generated token ids into text deltas, releasing only complete characters.

    A byte-level BPE token may end inside a multi-byte UTF-8 character (and a SentencePiece
    byte-fallback token is one byte), and some decoders depend on the previous token (leading
    spaces), so the text of each new token is the difference between decoding a short window
    with and without it. A delta ending in U+FFFD is held back until the character completes,
    for at most 3 tokens (a character has at most 4 bytes): a model that really emits broken
    bytes still gets its replacement characters out. Special tokens (e.g. the end of turn)
    produce no text.
    """

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # end of the text already released

    def push(self, token: int) -> str:
        if token in self._tokenizer.special_ids:
            return ""
        self._ids.append(token)
        released = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if text.endswith("\ufffd") and len(self._ids) - self._read < 4:
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(released) :]

    def flush(self) -> str:
        """What is still held back (an incomplete character becomes U+FFFD); the stream restarts."""
        released = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(released) :]


class ChatTokenizer:
    """Tokens and chat template of one model; see the module docstring for how turns are built.

    Args:
        tokenizer: the ``tokenizers.Tokenizer``, special tokens registered as added tokens.
        chat_template: the Jinja source, rendered as ``transformers`` renders it.
        special_tokens: ``bos_token``/``eos_token``/``unk_token``/``pad_token`` -> token text
            (those the model has); passed to the template under those names.
        source: the file the tokenizer came from, named in errors.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        special_tokens: Mapping[str, str],
        source: str,
    ) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens)
        self.source = source
        try:
            self._template = _compile(chat_template)
        except jinja2.TemplateError as exc:
            raise CheckpointError(f"{source}: the chat template does not compile: {exc}") from exc
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._special_texts = sorted(
            (t.content for t in added.values() if t.special), key=len, reverse=True
        )
        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")
        self._contexts: dict[str, list[dict[str, str]]] = {}
        self._generation_prefix = self._derive_generation_prefix()
        self.end_ids, self.after_end_text = self._derive_turn_end()

    # -- tokens ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows (added tokens included); the model's embedding may be larger."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) are recognised.

        No BOS is added: the chat template writes it where the model wants it.
        """
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], *, special: bool = False) -> str:
        """Text of ``ids``; special tokens are dropped, or written out with ``special``."""
        return str(self._tok.decode(list(ids), skip_special_tokens=not special))

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled ``text`` (e.g. ``<|im_end|>``), or None."""
        i = self._tok.token_to_id(text)
        return None if i is None else int(i)

    def stream(self) -> TextStream:
        """A fresh detokenizer for one reply's generated ids."""
        return TextStream(self)

    # -- chat template --------------------------------------------------------------------

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        """The template applied to ``messages`` (dicts with ``role`` and ``content``), as
        ``transformers``' ``apply_chat_template(..., tokenize=False)`` renders it."""
        try:
            return str(
                self._template.render(
                    messages=[dict(m) for m in messages],
                    tools=None,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **self.special_tokens,
                )
            )
        except jinja2.TemplateError as exc:
            raise CheckpointError(
                f"{self.source}: the chat template cannot render this conversation: {exc}"
            ) from exc

    def turn_text(self, role: str, text: str, first: bool) -> str:
        """Exactly the text the template adds for one more message ``role``/``text``.

        With ``first`` it is the conversation's first message and includes whatever the
        template writes before or with it (BOS, a default system prompt). Concatenating the
        pieces of a conversation gives its :meth:`render`.
        """
        before = [] if first else self._context(role)
        return self._addition(before, {"role": role, "content": text})

    def generation_prefix(self) -> str:
        """What ``add_generation_prompt`` adds: the opening of the assistant's reply."""
        return self._generation_prefix

    # -- files ----------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (chat template and special
        tokens) that :meth:`from_dir` and ``transformers.AutoTokenizer`` read back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        atomic_write(directory / TOKENIZER_FILE, self._tok.to_str().encode(), mode=0o644)
        atomic_write(
            directory / TOKENIZER_CONFIG_FILE,
            (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(),
            mode=0o644,
        )

    @classmethod
    def from_dir(cls, directory: Path) -> ChatTokenizer:
        """The tokenizer of a Hugging Face model directory (``tokenizer.json``,
        ``tokenizer_config.json``, the template there or in ``chat_template.jinja``)."""
        directory = Path(directory)
        tok_file, cfg_file = directory / TOKENIZER_FILE, directory / TOKENIZER_CONFIG_FILE
        if not tok_file.is_file():
            raise CheckpointError(
                f"{tok_file}: missing (only fast tokenizers saved as tokenizer.json are supported)"
            )
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise CheckpointError(f"{tok_file}: unreadable tokenizer: {exc}") from exc
        config = _read_json(cfg_file) if cfg_file.is_file() else {}
        template = _template_of(config, directory / CHAT_TEMPLATE_FILE)
        if template is None:
            raise CheckpointError(
                f"{cfg_file}: no chat_template (nor {CHAT_TEMPLATE_FILE}): a base model without"
                " a chat template cannot hold a conversation; use its instruct/chat variant"
            )
        legacy = directory / _SPECIAL_TOKENS_MAP_FILE
        fallback = _read_json(legacy) if legacy.is_file() else {}
        special: dict[str, str] = {}
        for name in _SPECIAL_NAMES:
            text = _token_text(config.get(name, fallback.get(name)))
            if text is not None:
                special[name] = text
        return cls(tokenizer, template, special, str(directory))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str) -> ChatTokenizer:
        """The tokenizer a GGUF describes, from its ``tokenizer.*`` metadata (plain values).

        Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``: Llama 3, Qwen2, SmolLM) is
        rebuilt; the pre-tokenizer is the one of the Hugging Face ``tokenizer.json`` that
        ``tokenizer.ggml.pre`` names.
        """
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(
                f"{source}: tokenizer.ggml.model={model!r} is not supported (only byte-level BPE,"
                " 'gpt2'); use the model's Hugging Face directory (with tokenizer.json) instead"
            )
        tokens: list[str] = _required(metadata, "tokenizer.ggml.tokens", source)
        merges: list[str] = _required(metadata, "tokenizer.ggml.merges", source)
        types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        template = metadata.get("tokenizer.chat_template")
        if not template:
            raise CheckpointError(
                f"{source}: no tokenizer.chat_template: a base model without a chat template"
                " cannot hold a conversation; use its instruct/chat variant"
            )
        tokenizer = _byte_level_bpe(
            tokens, merges, types, metadata.get("tokenizer.ggml.pre"), source
        )
        special: dict[str, str] = {}
        for name, key in _GGUF_SPECIAL_IDS.items():
            i = metadata.get(key)
            if i is not None:
                if not 0 <= i < len(tokens):
                    raise CheckpointError(f"{source}: {key}={i} is not a token id")
                special[name] = tokens[i]
        return cls(tokenizer, template, special, source)

    # -- derived turn structure -----------------------------------------------------------

    def _special_id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.token_id(text)

    def _addition(self, before: list[dict[str, str]], message: dict[str, str]) -> str:
        head = self.render(before, False) if before else self._render_empty()
        whole = self.render([*before, message], False)
        if not whole.startswith(head):
            raise CheckpointError(
                f"{self.source}: the chat template rewrites earlier messages when a"
                f" {message['role']} message is added; turns cannot be appended one at a time"
            )
        return whole[len(head) :]

    def _render_empty(self) -> str:
        # Templates that index messages[0] fail on no messages; nothing precedes the first one.
        try:
            return self.render([], False)
        except CheckpointError:
            return ""

    def _context(self, role: str) -> list[dict[str, str]]:
        """A short conversation after which the template accepts a ``role`` message."""
        if role not in self._contexts:
            for roles in _CONTEXTS:
                before = [{"role": r, "content": _PROBE_CONTEXT[r]} for r in roles]
                try:
                    added = self._addition(before, {"role": role, "content": _PROBE})
                except CheckpointError:
                    continue
                if _PROBE in added:
                    self._contexts[role] = before
                    break
            else:
                raise CheckpointError(
                    f"{self.source}: the chat template does not render a {role!r} message"
                    " after a user or assistant message"
                )
        return self._contexts[role]

    def _derive_generation_prefix(self) -> str:
        messages = [{"role": "user", "content": _PROBE}]
        closed, opened = self.render(messages, False), self.render(messages, True)
        if not opened.startswith(closed) or opened == closed:
            raise CheckpointError(
                f"{self.source}: the chat template's add_generation_prompt adds no assistant"
                " header after the conversation"
            )
        return opened[len(closed) :]

    def _derive_turn_end(self) -> tuple[tuple[int, ...], str]:
        """(end ids, text after the terminator) from how the template closes an assistant turn.

        The terminator is the first special token after the content (``<|im_end|>``,
        ``<|eot_id|>``, ``</s>``) and comes first in the end ids, then eos; what follows it up
        to the next message is ``after_end_text``.
        """
        turn = self.turn_text("assistant", _PROBE, first=False)
        tail = turn[turn.index(_PROBE) + len(_PROBE) :]
        found = [(tail.find(s), s) for s in self._special_texts if s in tail]
        ends: list[int | None] = []
        after = ""
        if found:
            at, terminator = min(found, key=lambda f: f[0])  # longest first on a tie (sorted)
            ends.append(self.token_id(terminator))
            after = tail[at + len(terminator) :]
        ends.append(self.eos_token_id)
        end_ids = tuple(dict.fromkeys(i for i in ends if i is not None))
        if not end_ids:
            raise CheckpointError(
                f"{self.source}: no end-of-turn token: no eos_token and the chat template"
                " closes an assistant message with no special token"
            )
        return end_ids, after


# ---------------------------------------------------------------------------------------------
# Building a tokenizer from GGUF metadata


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are spelled."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_bpe(
    tokens: list[str], merges: list[str], types: list[int], pre: str | None, source: str
) -> Tokenizer:
    """The Hugging Face byte-level BPE tokenizer that llama.cpp's description stands for."""
    split: pre_tokenizers.PreTokenizer
    normalizer: normalizers.Normalizer | None = None
    ignore_merges = False
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        split = byte_level
    elif pre in _DIGITS_PRE:
        split = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        regex = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT
        split = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        # Llama 3's tokenizer.json takes a whole word from the vocabulary before merging
        # (llama.cpp does too); Qwen2's normalises to NFC first.
        ignore_merges = pre in _LLAMA3_PRE
        normalizer = normalizers.NFC() if pre in _QWEN2_PRE else None
    else:
        known = sorted({*_GPT2_PRE, *_DIGITS_PRE, *_LLAMA3_PRE, *_QWEN2_PRE})
        raise CheckpointError(
            f"{source}: tokenizer.ggml.pre={pre!r} is not supported (known: {', '.join(known)});"
            " use the model's Hugging Face directory (with tokenizer.json) instead"
        )
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=False)):
        if kind in (_CONTROL, _USER_DEFINED):
            # Matched whole in the text and decoded as written, never byte-level spelled.
            added.append(AddedToken(token, special=kind == _CONTROL, normalized=False))
        elif not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab[token] = i
    try:
        pairs = [(left, right) for left, _, right in (m.partition(" ") for m in merges)]
        tokenizer = Tokenizer(
            models.BPE(
                vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges
            )
        )
    except Exception as exc:  # tokenizers raises bare Exceptions on inconsistent input
        raise CheckpointError(f"{source}: inconsistent tokenizer vocabulary/merges: {exc}") from exc
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = split
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Helpers


@cache
def _compile(source: str) -> jinja2.Template:
    """The template compiled in the environment ``transformers`` renders chat templates in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson escapes HTML characters, which a prompt must not have.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _required(metadata: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in metadata:
        raise CheckpointError(f"{source}: metadata key {key} is missing")
    return metadata[key]


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _template_of(config: Mapping[str, Any], jinja_file: Path) -> str | None:
    """The default chat template: tokenizer_config's (a string or a list of named ones) or
    transformers 5's separate file."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    return None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: text, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def small_chatml_tokenizer(corpus: Sequence[str], vocab_size: int = 300) -> ChatTokenizer:
    """A byte-level BPE trained on ``corpus`` (milliseconds) with ChatML special tokens and a
    ChatML template with a default system prompt: for tests and the quick benchmark."""
    from tokenizers import decoders, models, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    return ChatTokenizer(
        tok, CHATML_TEMPLATE, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, "small BPE"
    )
