"""The OpenAI batch file format, as vLLM's `run-batch` reads and writes it: one JSON request per input line,
one JSON record per output line.

An input line is {"custom_id": str, "method": "POST", "url": "/v1/chat/completions" or "/v1/completions",
"body": {...}}. A line that cannot be served (bad JSON, a missing field, a bad parameter, a prompt too long)
becomes an `ErrorRecord` for that line, never an exception: one bad request does not stop the batch.

Output records follow the OpenAI batch output: {"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error": null} for a result, {"id", "custom_id", "response": null, "error": {"code",
"message"}} for a failure. `BatchWriter` appends them durably and, when a killed job is run again with the
same input and output, tells `read_requests` which requests are already answered, so the rerun does the rest.

    with BatchWriter(out_path) as writer:
        for item in read_requests(in_path, codec, vocab_size, max_len, done=writer.done_ids()):
            if isinstance(item, ErrorRecord):
                writer.write(item.record())
            else:
                ...  # generate, then writer.write(result_record(item, token_ids, text, finish_reason))
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmjax.errors import InputError
from glmjax.files import open_regular, regular_file
from glmjax.serve.requests import Request, is_int, sampling_params_from_body
from glmjax.serve.text import TextCodec

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# The error codes of ErrorRecord (the strings OpenAI uses where it has one).
INVALID_JSON = "invalid_json"
INVALID_REQUEST = "invalid_request"
INVALID_URL = "invalid_url"
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


@dataclass(frozen=True)
class ErrorRecord:
    """A request that cannot be served. custom_id is the line's own, or "line-<n>" when it has none."""

    custom_id: str
    line_no: int
    code: str
    message: str  # starts with "line <n>: " and names the field at fault

    def record(self) -> dict:
        return error_record(self.custom_id, self.code, self.message)


class _LineError(InputError):
    """An InputError with the error code its record gets (INVALID_REQUEST unless it says otherwise)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------- input lines


def parse_line(line: str, line_no: int, codec: TextCodec | None, vocab_size: int, max_len: int
               ) -> Request | ErrorRecord:
    """One line of a batch input file (line_no counts from 1) as a Request, or the ErrorRecord saying why not.

    Chat bodies need `messages` (a list of {role, content}; content a string, null, or a list of text parts)
    and may add vLLM's `chat_template_kwargs` (e.g. {"enable_thinking": false}) and `add_generation_prompt`.
    Completion bodies need `prompt`: a string, a list of token ids (which a checkpoint without a tokenizer
    can serve), or a list holding one of those. Text needs `codec`. The prompt's ids must lie in
    [0, vocab_size), and prompt + max_tokens within max_len. Without max_tokens, a completion gets 16 tokens
    (OpenAI's default) and a chat the room left in max_len (as OpenAI and vLLM do). The sampling
    parameters are read by `sampling_params_from_body`. Without a codec, return_token_ids is switched on:
    token ids are then the only output.

    Checking duplicate custom_ids needs the whole file: `read_requests` does it.
    """
    fallback = f"line-{line_no}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return ErrorRecord(fallback, line_no, INVALID_JSON,
                           f"line {line_no}: not valid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return ErrorRecord(fallback, line_no, INVALID_JSON, f"line {line_no}: JSON nested too deeply")
    if not isinstance(obj, dict):
        return ErrorRecord(fallback, line_no, INVALID_REQUEST,
                           f"line {line_no}: expected a JSON object, got {type(obj).__name__}")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return ErrorRecord(fallback, line_no, INVALID_REQUEST,
                           f"line {line_no}: custom_id: missing, or not a non-empty string ({custom_id!r})")
    try:
        return _request(obj, custom_id, codec, vocab_size, max_len)
    except InputError as e:
        return ErrorRecord(custom_id, line_no, getattr(e, "code", INVALID_REQUEST), f"line {line_no}: {e}")


def _request(obj: Mapping, custom_id: str, codec: TextCodec | None, vocab_size: int, max_len: int) -> Request:
    if obj.get("method") != "POST":
        raise InputError(f"method: expected \"POST\", got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        raise _LineError(INVALID_URL, f"url: {url!r} is not served; use {CHAT_URL!r} or {COMPLETIONS_URL!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise InputError(f"body: missing, or not a JSON object ({type(body).__name__})")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InputError(f"body.model: expected a string, got {type(model).__name__}")

    kind = "chat" if url == CHAT_URL else "completion"
    if kind == "chat":
        name, prompt_text, ids = "body.messages", *_chat_prompt(body, codec)
    else:
        name, prompt_text, ids = _completion_prompt(body, codec)
    if not ids:
        raise InputError(f"{name}: empty prompt (no tokens)")
    for j, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            where = f"{name}[{j}]" if prompt_text is None else f"{name} (token {j} of its encoding)"
            raise InputError(f"{where}: token id {t} is out of range: ids must be in [0, vocab_size={vocab_size})")

    room = max_len - len(ids)
    if room < 1:
        raise _LineError(CONTEXT_LENGTH_EXCEEDED, f"{name}: over-long prompt: {len(ids)} tokens leave no room "
                                                  f"for output within the maximum length {max_len}")
    default = room if kind == "chat" else COMPLETIONS_DEFAULT_MAX_TOKENS
    params = sampling_params_from_body(body, default_max_tokens=default)
    if len(ids) + params.max_tokens > max_len:
        raise _LineError(CONTEXT_LENGTH_EXCEEDED,
                         f"body.max_tokens: over-long prompt: {len(ids)} prompt tokens + max_tokens "
                         f"{params.max_tokens} = {len(ids) + params.max_tokens} exceeds the maximum length "
                         f"{max_len}")
    for j, t in enumerate(params.stop_token_ids):
        if t >= vocab_size:
            raise InputError(f"body.stop_token_ids[{j}]: token id {t} is out of range [0, vocab_size={vocab_size})")
    if codec is None:
        if params.stop:
            raise InputError("body.stop: stop strings need the checkpoint's tokenizer.json, which it lacks; "
                             "use stop_token_ids")
        params = dataclasses.replace(params, return_token_ids=True)
    return Request(id=custom_id, prompt_ids=tuple(ids), params=params, kind=kind, prompt_text=prompt_text,
                   model=model)


def _completion_prompt(body: Mapping, codec: TextCodec | None) -> tuple[str, str | None, list[int]]:
    """(field name, prompt text or None, token ids) of a completion body's `prompt`."""
    name, p = "body.prompt", body.get("prompt")
    if p is None:
        raise InputError(f"{name}: missing (a completion needs a prompt: a string or a list of token ids)")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        name, p = "body.prompt[0]", p[0]  # the batched form, with a single prompt
    if isinstance(p, str):
        if codec is None:
            raise InputError(f"{name}: a text prompt needs the checkpoint's tokenizer.json, which it lacks; "
                             "send a list of token ids")
        if not p:
            raise InputError(f"{name}: empty prompt")
        return name, p, codec.encode(p)
    if not isinstance(p, list):
        raise InputError(f"{name}: expected a string or a list of token ids, got {type(p).__name__}")
    if len(p) > 1 and all(isinstance(x, str | list) for x in p):
        raise InputError(f"{name}: {len(p)} prompts in one request; a batch file takes one prompt per line")
    for j, t in enumerate(p):
        if not is_int(t):
            raise InputError(f"{name}[{j}]: expected an integer token id, got {type(t).__name__} {t!r}")
    return name, None, [int(t) for t in p]


def _chat_prompt(body: Mapping, codec: TextCodec | None) -> tuple[str, list[int]]:
    """(rendered prompt, token ids) of a chat body."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InputError("body.messages: missing, or not a non-empty list of messages")
    if codec is None:
        raise InputError("body.messages: chat needs the checkpoint's tokenizer.json, which it lacks; "
                         f"use {COMPLETIONS_URL} with a prompt of token ids")
    messages = [_message(m, i) for i, m in enumerate(msgs)]
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InputError(f"body.chat_template_kwargs: expected a JSON object, got {type(kwargs).__name__}")
    generation_prompt = body.get("add_generation_prompt")
    generation_prompt = True if generation_prompt is None else generation_prompt
    if not isinstance(generation_prompt, bool):
        raise InputError(f"body.add_generation_prompt: expected true or false, got {generation_prompt!r}")
    text = codec.render_chat(messages, kwargs, add_generation_prompt=generation_prompt)
    # The template wrote the special tokens itself; adding the post-processor's again would double a BOS.
    return text, codec.encode(text, add_special_tokens=False)


def _message(m: Any, i: int) -> dict:
    """A chat message for the template: content flattened to a string when it is a list of text parts
    (OpenAI's other content form), every other key (name, tool_calls, ...) passed on as it is."""
    if not isinstance(m, dict):
        raise InputError(f"body.messages[{i}]: expected an object with role and content, got {type(m).__name__}")
    if not isinstance(m.get("role"), str):
        raise InputError(f"body.messages[{i}].role: missing, or not a string")
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InputError(f"body.messages[{i}].content[{j}]: only text parts ({{\"type\": \"text\", "
                                 "\"text\": ...}) are supported")
            texts.append(part["text"])
        content = "\n".join(texts)
    elif content is not None and not isinstance(content, str):
        raise InputError(f"body.messages[{i}].content: expected a string, a list of text parts or null, "
                         f"got {type(content).__name__}")
    return {**m, "content": content}


@dataclass(frozen=True)
class DoneIds:
    """What an output file already answers: `custom_id in done` for results and errors, plus the count of
    duplicate-custom_id errors per id (those answer a later line with the same id, not the id itself)."""

    ids: frozenset[str] = frozenset()
    duplicates: Mapping[str, int] = field(default_factory=dict)

    def __contains__(self, custom_id: object) -> bool:
        return custom_id in self.ids

    def __len__(self) -> int:
        return len(self.ids) + sum(self.duplicates.values())


def read_requests(path: str | Path, codec: TextCodec | None, vocab_size: int, max_len: int, *,
                  done: DoneIds | None = None) -> Iterator[Request | ErrorRecord]:
    """The requests of a batch input file, in file order, read as they are consumed (the file may be large).

    Blank lines are skipped. A custom_id seen on an earlier line gives an ErrorRecord (DUPLICATE_CUSTOM_ID)
    for the later line, which is not run. With `done` (`BatchWriter.done_ids()` of the output file), lines
    already answered are skipped, so a rerun of an interrupted job yields only what is missing. Raises
    InputError only when the file itself cannot be read.
    """
    seen: dict[str, int] = {}  # custom_id -> line of its first use
    duplicates: Counter[str] = Counter()
    with open_regular(path, InputError) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                item = ErrorRecord(f"line-{n}", n, INVALID_JSON,
                                   f"line {n}: not UTF-8 text ({e.reason} at byte {e.start})")
            else:
                if not line.strip():
                    continue
                item = parse_line(line, n, codec, vocab_size, max_len)
            cid = item.id if isinstance(item, Request) else item.custom_id
            if cid in seen:
                duplicates[cid] += 1
                # Duplicates of one id are answered in file order, so the first k are those already written.
                if done is not None and duplicates[cid] <= done.duplicates.get(cid, 0):
                    continue
                yield ErrorRecord(cid, n, DUPLICATE_CUSTOM_ID, f"line {n}: custom_id: {cid!r} is already used on "
                                                               f"line {seen[cid]}; custom_ids must be unique")
                continue
            seen[cid] = n
            if done is not None and cid in done:
                continue
            yield item


# ---------------------------------------------------------------------------------------------- output records


def _uid() -> str:
    return uuid.uuid4().hex


def result_record(request: Request, token_ids: Sequence[int], text: str, finish_reason: str, *,
                  stop_reason: str | int | None = None, model: str | None = None, created: int | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict:
    """The output record of a finished request.

    The body is a `chat.completion` or a `text_completion` with one choice, as OpenAI's (plus vLLM's
    `stop_reason`: the stop string or stop token id that ended it). With params.return_token_ids the
    choice has `token_ids` and the prompt's ids go in `prompt_token_ids` (on the body for chat, on the
    choice for completions, where vLLM puts them). `model` names the model when the request did not;
    `created` defaults to now. `extra`, glmjax's own numbers for the request (speculative acceptance, say),
    goes under body["glmjax"], a key no OpenAI client reads."""
    chat = request.kind == "chat"
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice.update(logprobs=None, finish_reason=finish_reason, stop_reason=stop_reason)
    body: dict[str, Any] = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{_uid()}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": request.model or model or "glmjax",
        "choices": [choice],
        "usage": {"prompt_tokens": len(request.prompt_ids), "completion_tokens": len(token_ids),
                  "total_tokens": len(request.prompt_ids) + len(token_ids)},
    }
    if request.params.return_token_ids:
        choice["token_ids"] = [int(t) for t in token_ids]
        (body if chat else choice)["prompt_token_ids"] = list(request.prompt_ids)
    if extra:
        body["glmjax"] = dict(extra)
    return {"id": f"batch_req_{_uid()}", "custom_id": request.id,
            "response": {"status_code": 200, "request_id": f"req_{_uid()}", "body": body}, "error": None}


def error_record(custom_id: str, code: str, message: str) -> dict:
    """The output record of a request that failed (a bad line, or an error while it ran)."""
    return {"id": f"batch_req_{_uid()}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


# ------------------------------------------------------------------------------------------------- the writer


class BatchWriter:
    """Appends records to a batch output file, one JSON line each, flushed and fsynced as written: what is
    written survives the job being killed.

    Opening an existing file reads what an earlier run wrote (`done_ids`). A last line without its newline
    is the torn write of a killed job: it is cut off (the file truncated to its last complete line) and its
    request runs again. A complete line that is not a record with a custom_id means the file is something
    else: InputError, rather than append to it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._done = self._recover()
        try:
            self._file = open(self.path, "ab")
        except OSError as e:
            raise InputError(f"{self.path}: cannot open for writing ({e.strerror})") from None

    def _recover(self) -> DoneIds:
        if not os.path.lexists(self.path):
            return DoneIds()
        regular_file(self.path, InputError)
        ids: set[str] = set()
        duplicates: Counter[str] = Counter()
        complete = 0  # bytes up to the end of the last complete line
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    break  # torn
                complete += len(raw)
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError:
                    rec = None
                cid = rec.get("custom_id") if isinstance(rec, dict) else None
                if not isinstance(cid, str):
                    raise InputError(f"{self.path}: line {n} is not a batch output record with a custom_id; "
                                     "refusing to append to a file that is not a batch output")
                error = rec.get("error")
                if isinstance(error, dict) and error.get("code") == DUPLICATE_CUSTOM_ID:
                    duplicates[cid] += 1
                else:
                    ids.add(cid)
        if complete < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(complete)
                os.fsync(f.fileno())
        return DoneIds(frozenset(ids), dict(duplicates))

    def done_ids(self) -> DoneIds:
        """The requests the file answered when it was opened (pass to read_requests as `done`)."""
        return self._done

    def write(self, record: Mapping[str, Any]) -> None:
        """One record as one line, on disk when this returns."""
        try:
            line = json.dumps(record, ensure_ascii=False) + "\n"
            data = line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape in the input: keep the escape
            data = (json.dumps(record) + "\n").encode("ascii")
        # One write of the whole line: a kill can tear only the last line, which the next run cuts off.
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["BatchWriter", "DoneIds", "ErrorRecord", "error_record", "parse_line", "read_requests",
           "result_record"]
