"""Text in and out of the engine: the checkpoint's tokenizer and chat template, and the detokenizer that
turns generated token ids into text and ends a request at a stop string.

A chat template is code that comes with the checkpoint. It runs in jinja2's immutable sandbox, with the
environment Hugging Face transformers gives it (so templates written for `apply_chat_template` render the
same here): trim_blocks and lstrip_blocks, the loop controls, a `tojson` that does not HTML-escape,
`raise_exception` and `strftime_now`. Unlike jinja2's default sandbox, an unsafe attribute raises at once
instead of rendering as an empty string, so a template that pokes at `__class__` fails loudly.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from glmjax.errors import CheckpointError, InputError
from glmjax.files import read_text
from glmjax.serve.requests import SamplingParams

# The special tokens transformers passes to a chat template (its special_tokens_map), when the checkpoint sets them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# Template variables the caller sets; chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARS = ("messages", "add_generation_prompt")
REPLACEMENT_CHAR = "\ufffd"  # what decoding yields for the bytes of a UTF-8 character not yet complete


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but an unsafe attribute (`''.__class__`, `list.append`) raises SecurityError
    where it is read. jinja2's default returns an Undefined that fails only when called or iterated and
    otherwise prints as ''."""

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` marks the assistant's text for training masks;
    serving only needs the text, so the body renders as it is."""

    tags = {"generation"}

    def parse(self, parser) -> list[nodes.Node]:
        next(parser.stream)  # the tag name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
    # Templates call this to refuse input (e.g. "roles must alternate"); the message reaches the user.
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson HTML-escapes <, >, & and ', which would change the prompt the model sees.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _environment() -> jinja2.Environment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path, CheckpointError))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _template_from_config(config: Mapping, path: Path) -> str | None:
    """tokenizer_config.json's "chat_template": a string, or a list of {name, template} (take "default")."""
    t = config.get("chat_template")
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list) and all(isinstance(x, Mapping) for x in t):
        named = {x.get("name"): x.get("template") for x in t}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise CheckpointError(f"{path}: chat_template lists templates {sorted(map(str, named))} but no "
                              "\"default\" one")
    raise CheckpointError(f"{path}: chat_template: expected a string or a list of {{name, template}}, "
                          f"got {type(t).__name__}")


class TextCodec:
    """A checkpoint's tokenizer.json (Hugging Face `tokenizers`) and its chat template, if any."""

    def __init__(self, tokenizer: Tokenizer, *, chat_template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None, source: str = "the checkpoint"):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # e.g. {"bos_token": "[gMASK]", ...}
        self.source = source  # names the checkpoint in error messages
        self._compiled: jinja2.Template | None = None

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> TextCodec | None:
        """The codec of a Hugging Face checkpoint directory, or None when it has no tokenizer.json.

        The chat template comes from chat_template.jinja if present (where newer transformers save it), else
        from tokenizer_config.json's "chat_template"; the special tokens from tokenizer_config.json. A file
        that is present but unreadable raises CheckpointError naming it."""
        d = Path(directory)
        tok_path = d / "tokenizer.json"
        if not tok_path.exists():
            return None
        text = read_text(tok_path, CheckpointError)
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for any malformed file
            raise CheckpointError(f"{tok_path}: not a tokenizer.json that `tokenizers` can load ({e})") from None

        config_path = d / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.exists() else {}
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            v = config.get(name)
            v = v.get("content") if isinstance(v, Mapping) else v  # an AddedToken saved as a dict
            if isinstance(v, str):
                special[name] = v

        jinja_path = d / "chat_template.jinja"
        template = (read_text(jinja_path, CheckpointError) if jinja_path.exists()
                    else _template_from_config(config, config_path))
        return cls(tokenizer, chat_template=template, special_tokens=special, source=str(d))

    @property
    def vocab_size(self) -> int:
        """Entries of the tokenizer's vocabulary, added tokens included (may differ from the model's)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. add_special_tokens lets the tokenizer's post-processor add its tokens (a BOS,
        say), as a completion prompt gets; a rendered chat template already holds its own, so chat passes
        False (as transformers' apply_chat_template and vLLM do)."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """The text of `ids`; special tokens (EOS, padding) are left out by default, as OpenAI servers do."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Mapping], chat_template_kwargs: Mapping | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, rendered by the checkpoint's chat template in the sandbox.

        The template sees `messages`, `add_generation_prompt`, the special tokens (`bos_token`,
        `eos_token`, ...) and every entry of chat_template_kwargs (e.g. `enable_thinking`), as with
        transformers' apply_chat_template. Raises InputError when there is no template, when a kwarg would
        replace `messages` or `add_generation_prompt`, and when the template fails or breaks the sandbox
        (with the template's message: raise_exception's text, the unsafe attribute, ...)."""
        if self.chat_template is None:
            raise InputError(f"messages: {self.source} has no chat template (no chat_template in "
                             "tokenizer_config.json, no chat_template.jinja); send a completion with a "
                             "\"prompt\" instead")
        kwargs = dict(chat_template_kwargs or {})
        for k in kwargs:
            if not isinstance(k, str):
                raise InputError(f"chat_template_kwargs: keys must be strings, got {k!r}")
            if k in RESERVED_TEMPLATE_VARS:
                raise InputError(f"chat_template_kwargs.{k}: reserved (set by the request itself)")
        context = {**self.special_tokens, **kwargs, "messages": messages,
                   "add_generation_prompt": add_generation_prompt}
        try:
            return self._template().render(**context)
        except TemplateError as e:
            raise InputError(f"chat template: {e}") from None
        except Exception as e:
            # The template is code from the checkpoint running on the request's data: any failure in it
            # ("'NoneType' has no len()", a bad index) is a fault of this input, not of glmjax.
            raise InputError(f"chat template failed: {type(e).__name__}: {e}") from None

    def _template(self) -> jinja2.Template:
        # Compiled on first use, so a broken template fails the chat requests only, not completions.
        if self._compiled is None:
            try:
                self._compiled = _environment().from_string(self.chat_template)
            except TemplateSyntaxError as e:
                raise InputError(f"chat template of {self.source}: syntax error at line {e.lineno}: "
                                 f"{e.message}") from None
        return self._compiled


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Progress:
    """What a `StopChecker.feed` found.

    text: the output text so far. While the request runs, it lacks a trailing character whose bytes are not
        all generated yet, and may end with the start of a stop string; once finished it is final (cut
        before the stop string).
    keep: how many of the ids just fed belong to the output: all of them, unless the request finished at
        one of them (then up to and including it; the engine drops the rest, e.g. the surplus of a
        speculative step).
    finish_reason: None while the request goes on; "stop" (EOS, a stop token id or a stop string) or
        "length" (max_tokens reached).
    stop_reason: the stop string or stop token id that ended it (None for EOS and length), as vLLM reports.
    """

    text: str
    keep: int
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopChecker:
    """The detokenizer and finish check of one request: feed it the generated ids as they come.

    Every fed id counts as output up to the one that finishes the request: EOS (one of eos_token_ids,
    unless params.ignore_eos), one of params.stop_token_ids, the id that completes a stop string, or the
    params.max_tokens-th id. The stop token or EOS is an output token (in token_ids and usage) but adds no
    text; a stop string and whatever follows it are cut from the text (OpenAI's semantics); when both a
    stop condition and max_tokens meet at one id, the finish reason is "stop".

    Text is decoded incrementally over a short window of ids (two small decodes per id, not the whole
    output), which is exact for byte-level BPE (GLM's, the demo's). A character whose UTF-8 bytes span
    several ids decodes to U+FFFD until its last byte arrives, so trailing U+FFFDs are held back until then
    (or until the request ends: then they are shown, as the final decode shows them).

    Without a codec (a checkpoint without tokenizer.json) the text stays empty and stop strings are refused.
    """

    def __init__(self, params: SamplingParams, codec: TextCodec | None, eos_token_ids: Iterable[int] = ()):
        if params.stop and codec is None:
            raise InputError("stop: stop strings need the checkpoint's tokenizer.json; use stop_token_ids")
        self.params = params
        self._codec = codec
        self._eos = frozenset() if params.ignore_eos else frozenset(int(t) for t in eos_token_ids)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._longest_stop = max((len(s) for s in params.stop), default=0)
        self._ids: list[int] = []  # output ids
        self._text_ids: list[int] = []  # output ids that carry text: all but a final EOS or stop token
        # The text of _text_ids[:_read] is settled in _settled; _text_ids[_prefix:_read] is the context window
        # decoded again with each new id (a decoder may render an id differently after some context).
        self._prefix = self._read = 0
        self._settled = ""
        self._pending = ""  # text of _text_ids[_read:], ending in an unfinished character
        self._text = ""  # what the request shows: settled + pending without its trailing U+FFFDs
        self._searched = 0  # _text[:_searched] holds no stop string
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The output ids so far (the ones kept)."""
        return tuple(self._ids)

    @property
    def text(self) -> str:
        return self._text

    def feed(self, ids: Iterable[int]) -> Progress:
        """Takes newly generated ids (one, or a speculative step's several) in order; see Progress."""
        if self.finished:
            raise RuntimeError("StopChecker.feed: the request has already finished")
        keep = 0
        for t in ids:
            t = int(t)
            keep += 1
            self._ids.append(t)
            if t in self._stop_ids or t in self._eos:
                self._finish("stop", t if t in self._stop_ids else None)
                break
            self._text_ids.append(t)
            self._decode_new()
            if not self.finished and len(self._ids) >= self.params.max_tokens:
                self._finish("length", None)
            if self.finished:
                break
        return Progress(self._text, keep, self.finish_reason, self.stop_reason)

    def _decode_new(self) -> None:
        if self._codec is None:
            return
        window = self._text_ids[self._prefix:]
        before = self._codec.decode(window[:self._read - self._prefix])
        after = self._codec.decode(window)
        self._pending = after[len(before):]
        if self._pending and not self._pending.endswith(REPLACEMENT_CHAR):
            # Only whole characters: settle them and slide the window forward.
            self._settled += self._pending
            self._pending = ""
            self._prefix, self._read = self._read, len(self._text_ids)
        self._text = self._settled + self._pending.rstrip(REPLACEMENT_CHAR)
        self._find_stop()

    def _find_stop(self) -> None:
        if not self.params.stop or len(self._text) <= self._searched:
            return
        # A stop string ending in the new text may start up to len(stop) - 1 characters before it.
        start = max(0, self._searched - self._longest_stop + 1)
        hits = [(i, s) for s in self.params.stop if (i := self._text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits)
            self._text = self._text[:i]
            self._finish("stop", s)
        else:
            self._searched = len(self._text)

    def _finish(self, reason: FinishReason, stop_reason: str | int | None) -> None:
        if not isinstance(stop_reason, str):
            # Not cut at a stop string: the final text shows every byte, unfinished characters included.
            self._text = self._settled + self._pending
        self.finish_reason, self.stop_reason = reason, stop_reason


__all__ = ["Progress", "StopChecker", "TextCodec"]
