"""The request and text layer of batch serving: sampling parameters, OpenAI bodies, chat templates in the
sandbox, incremental detokenization with stop strings, and the batch file reader and writer."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from glmjax.errors import InputError
from glmjax.serve.batch_file import (
    CONTEXT_LENGTH_EXCEEDED,
    DUPLICATE_CUSTOM_ID,
    INVALID_JSON,
    INVALID_URL,
    BatchWriter,
    ErrorRecord,
    error_record,
    parse_line,
    read_requests,
    result_record,
)
from glmjax.serve.requests import Request, SamplingParams, fold_seed, sampling_params_from_body
from glmjax.serve.text import StopChecker, TextCodec

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
VOCAB = 2048  # models/demo/config.json
EOS = 1
MAX_LEN = 64

# A small template in the style of GLM's: a thinking switch passed through chat_template_kwargs.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
    "<think></think>{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def demo_codec() -> TextCodec:
    codec = TextCodec.from_checkpoint(DEMO)
    assert codec is not None
    return codec


def _checkpoint(tmp_path: Path, template: str | None = TEMPLATE, **config) -> Path:
    shutil.copy(DEMO / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = {"bos_token": "<|pad|>", "eos_token": {"content": "<|endoftext|>"}, **config}
    if template is not None:
        cfg["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.fixture
def chat_codec(tmp_path) -> TextCodec:
    return TextCodec.from_checkpoint(_checkpoint(tmp_path))


# -------------------------------------------------------------------------------------------- SamplingParams


def test_sampling_params_normalise():
    p = SamplingParams(temperature=0, top_k=-1, seed=42, stop=["a"], stop_token_ids=[3])
    assert (p.temperature, p.top_k, p.seed, p.stop, p.stop_token_ids) == (0.0, 0, 42, ("a",), (3,))
    assert isinstance(p.temperature, float) and p.greedy
    assert fold_seed(-1) == 0 and fold_seed(2**32) == 1 and fold_seed(2**32 - 1) == 2**32 - 1
    assert SamplingParams(seed=2**63).seed == fold_seed(2**63)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"),
    ({"temperature": math.nan}, "temperature"), ({"temperature": -0.5}, "temperature"),
    ({"temperature": 101}, "temperature"), ({"temperature": "1"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_k": False}, "top_k"),
    ({"seed": 2**64}, "seed"), ({"seed": "7"}, "seed"), ({"seed": True}, "seed"),
    ({"stop": ("a", "b", "c", "d", "e")}, "stop"), ({"stop": ("",)}, "stop[0]"), ({"stop": "abc"}, "stop"),
    ({"stop": ("a", 3)}, "stop[1]"), ({"stop_token_ids": (-1,)}, "stop_token_ids[0]"),
    ({"stop_token_ids": 5}, "stop_token_ids"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"return_token_ids": "yes"}, "return_token_ids"),
])
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises(InputError) as e:
        SamplingParams(**kwargs)
    assert str(e.value).startswith(f"{field}:")


def test_body_parsing():
    p = sampling_params_from_body({
        "model": "m", "max_tokens": 5, "temperature": 0, "top_p": 0.9, "stop": "x", "top_k": -1, "seed": 3,
        "stop_token_ids": [7], "ignore_eos": True, "return_token_ids": True, "n": 1,
        "frequency_penalty": 0.5, "logprobs": None, "user": "u",  # OpenAI keys not used: ignored
    })
    assert p == SamplingParams(max_tokens=5, temperature=0.0, top_p=0.9, stop=("x",), seed=3, stop_token_ids=(7,),
                               ignore_eos=True, return_token_ids=True)
    assert sampling_params_from_body({"max_completion_tokens": 9, "stop": ["a", "b"]}).max_tokens == 9
    assert sampling_params_from_body({"max_tokens": None}, default_max_tokens=33).max_tokens == 33
    assert sampling_params_from_body({}).max_tokens == 16


@pytest.mark.parametrize("body, field", [
    ({"n": 2}, "body.n"), ({"max_tokens": "5"}, "body.max_tokens"), ({"max_tokens": 0}, "body.max_tokens"),
    ({"max_completion_tokens": 1.5}, "body.max_completion_tokens"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "body.max_completion_tokens"),
    ({"temperature": "hot"}, "body.temperature"), ({"temperature": -1}, "body.temperature"),
    ({"top_p": 2}, "body.top_p"), ({"top_k": "3"}, "body.top_k"), ({"seed": 1.0}, "body.seed"),
    ({"stop": 5}, "body.stop"), ({"stop": ["a", 3]}, "body.stop[1]"), ({"stop_token_ids": 3}, "body.stop_token_ids"),
    ({"stop_token_ids": [1, "2"]}, "body.stop_token_ids[1]"), ({"ignore_eos": "true"}, "body.ignore_eos"),
    ({"return_token_ids": 1}, "body.return_token_ids"),
])
def test_body_errors_name_the_field(body, field):
    with pytest.raises(InputError) as e:
        sampling_params_from_body(body)
    assert str(e.value).startswith(f"{field}:")
    if field == "body.n":
        assert "n = 1" in str(e.value)


# ------------------------------------------------------------------------------------------------- TextCodec


def test_codec_round_trip_and_missing_tokenizer(demo_codec, tmp_path):
    assert TextCodec.from_checkpoint(tmp_path) is None
    assert demo_codec.chat_template is None and demo_codec.vocab_size == VOCAB
    text = "def f(x):\n    return 'é😀'"
    assert demo_codec.decode(demo_codec.encode(text)) == text
    with pytest.raises(InputError, match="no chat template.*prompt"):
        demo_codec.render_chat([{"role": "user", "content": "hi"}])


def test_chat_template_with_kwargs(chat_codec):
    msgs = [{"role": "user", "content": "hi"}]
    assert chat_codec.render_chat(msgs) == "<|pad|><|user|>hi<|assistant|>"
    assert (chat_codec.render_chat(msgs, {"enable_thinking": False})
            == "<|pad|><|user|>hi<|assistant|><think></think>")
    assert chat_codec.render_chat(msgs, add_generation_prompt=False) == "<|pad|><|user|>hi"
    with pytest.raises(InputError, match="chat_template_kwargs.messages"):
        chat_codec.render_chat(msgs, {"messages": []})


def test_template_sources(tmp_path):
    listed = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]
    codec = TextCodec.from_checkpoint(_checkpoint(tmp_path, listed))
    assert codec.render_chat([]) == "D<|endoftext|>"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")  # preferred, as transformers does
    assert TextCodec.from_checkpoint(tmp_path).render_chat([{"role": "user", "content": "x"}]) == "J1"


@pytest.mark.parametrize("template, match", [
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ ''.__class__ }}", "unsafe"),  # jinja2's default sandbox would print '' here
    ("{% set x = [] %}{{ x.append(1) }}", "unsafe"),
    ("{{ messages.pop() }}", "unsafe"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{% for m in messages %}", "syntax error"),
    ("{{ messages[0]['content'] + 1 }}", "chat template"),
])
def test_template_sandbox_and_failures(tmp_path, template, match):
    codec = TextCodec.from_checkpoint(_checkpoint(tmp_path, template))
    with pytest.raises(InputError, match=match):
        codec.render_chat([{"role": "user", "content": "hi"}])


def test_tojson_does_not_escape(tmp_path):
    codec = TextCodec.from_checkpoint(_checkpoint(tmp_path, "{{ messages[0] | tojson }}"))
    assert codec.render_chat([{"role": "user", "content": "<a & 'é'>"}]) == '{"role": "user", "content": "<a & \'é\'>"}'


# ----------------------------------------------------------------------------------------------- StopChecker


def test_stop_string_spanning_two_tokens(demo_codec):
    ids = demo_codec.encode("hello world")  # he l lo ' w' or ld
    assert [demo_codec.decode([i]) for i in ids] == ["he", "l", "lo", " w", "or", "ld"]
    one = StopChecker(SamplingParams(max_tokens=50, stop=("lo wo",)), demo_codec, [EOS])
    got = [one.feed([t]) for t in ids[:5]]
    assert [p.text for p in got[:4]] == ["he", "hel", "hello", "hello w"]
    assert got[4].finished and got[4].text == "hel" and got[4].stop_reason == "lo wo" and got[4].keep == 1
    # A speculative step's several ids at once: keep counts up to the one that completed the stop string.
    many = StopChecker(SamplingParams(max_tokens=50, stop=("xyz", "lo wo")), demo_codec, [EOS])
    p = many.feed(ids + [EOS])
    assert (p.text, p.keep, p.finish_reason, many.token_ids) == ("hel", 5, "stop", tuple(ids[:5]))
    with pytest.raises(RuntimeError):
        many.feed([5])


def test_stop_at_first_token(demo_codec):
    checker = StopChecker(SamplingParams(stop=("he",)), demo_codec, [EOS])
    p = checker.feed(demo_codec.encode("hello"))
    assert (p.text, p.keep, p.finish_reason, p.stop_reason) == ("", 1, "stop", "he")


def test_multibyte_character_split_across_tokens(demo_codec):
    ids = demo_codec.encode("aé😀b")
    assert len(ids) == 8  # a, é in 2 byte tokens, 😀 in 4, b
    checker = StopChecker(SamplingParams(max_tokens=50), demo_codec, [EOS])
    texts = [checker.feed([t]).text for t in ids]
    assert texts == ["a", "a", "aé", "aé", "aé", "aé", "aé😀", "aé😀b"]
    assert all("\ufffd" not in t for t in texts)
    # A stop string whose first character arrives in two tokens.
    stopped = StopChecker(SamplingParams(max_tokens=50, stop=("é",)), demo_codec, [EOS])
    p = stopped.feed(ids)
    assert (p.text, p.keep) == ("a", 3)
    # Cut by max_tokens in the middle of a character: the final text shows what the bytes decode to.
    cut = StopChecker(SamplingParams(max_tokens=4), demo_codec, [EOS])
    p = cut.feed(ids)
    assert (p.text, p.keep, p.finish_reason) == ("aé\ufffd", 4, "length")


def test_eos_stop_tokens_and_length(demo_codec):
    ids = demo_codec.encode("hello")
    p = StopChecker(SamplingParams(), demo_codec, [EOS]).feed([ids[0], EOS, ids[1]])
    assert (p.text, p.keep, p.finish_reason, p.stop_reason) == ("he", 2, "stop", None)
    p = StopChecker(SamplingParams(stop_token_ids=(ids[1],)), demo_codec, [EOS]).feed(ids)
    assert (p.text, p.keep, p.stop_reason) == ("he", 2, ids[1])
    p = StopChecker(SamplingParams(max_tokens=3, ignore_eos=True), demo_codec, [EOS]).feed([ids[0], EOS, ids[1], 7])
    assert (p.text, p.keep, p.finish_reason) == ("hel", 3, "length")
    no_text = StopChecker(SamplingParams(max_tokens=2), None, [EOS])
    assert no_text.feed([5, 6, 7]).keep == 2 and no_text.text == "" and no_text.token_ids == (5, 6)
    with pytest.raises(InputError, match="stop"):
        StopChecker(SamplingParams(stop=("x",)), None, [EOS])


# ---------------------------------------------------------------------------------------------- batch lines


def _line(custom_id="r", url="/v1/completions", **body) -> str:
    obj = {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "demo", **body}}
    if custom_id is None:
        del obj["custom_id"]
    return json.dumps(obj)


def test_parse_prompt_forms(chat_codec):
    parse = lambda line: parse_line(line, 1, chat_codec, VOCAB, MAX_LEN)
    hello = tuple(chat_codec.encode("hello"))
    for prompt in ("hello", ["hello"], list(hello), [list(hello)]):
        r = parse(_line(prompt=prompt, max_tokens=4))
        assert isinstance(r, Request) and r.prompt_ids == hello and r.kind == "completion", prompt
        assert r.params.max_tokens == 4 and r.model == "demo"
    assert parse(_line(prompt="hello")).params.max_tokens == 16  # OpenAI's default for completions
    chat = parse(_line(url="/v1/chat/completions", temperature=0,
                       messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                       chat_template_kwargs={"enable_thinking": False}))
    assert isinstance(chat, Request) and chat.kind == "chat"
    assert chat.prompt_text == "<|pad|><|user|>hi<|assistant|><think></think>"
    assert chat.prompt_ids[0] == 0  # the template's <|pad|> is the special token, added once
    assert chat.params.max_tokens == MAX_LEN - len(chat.prompt_ids)  # chat without max_tokens: the room left


def test_parse_without_tokenizer():
    r = parse_line(_line(prompt=[5, 6, 7], max_tokens=2), 1, None, VOCAB, MAX_LEN)
    assert isinstance(r, Request) and r.params.return_token_ids  # token ids are the only output then
    for line, field in ((_line(prompt="hi"), "body.prompt"),
                        (_line(url="/v1/chat/completions", messages=[{"role": "user", "content": "x"}]),
                         "body.messages"),
                        (_line(prompt=[5], stop="x"), "body.stop")):
        e = parse_line(line, 2, None, VOCAB, MAX_LEN)
        assert isinstance(e, ErrorRecord) and e.message.startswith(f"line 2: {field}:"), e


@pytest.mark.parametrize("line, code, field", [
    ("{not json", INVALID_JSON, "not valid JSON"),
    ("[1, 2]", "invalid_request", "expected a JSON object"),
    (_line(custom_id=None, prompt=[5]), "invalid_request", "custom_id"),
    (_line(prompt=[5], temperature=-1), "invalid_request", "body.temperature"),
    (_line(prompt=[5], n=2), "invalid_request", "body.n"),
    (_line(url="/v1/embeddings", input="x"), INVALID_URL, "url"),
    (_line(prompt=["a", "b"]), "invalid_request", "one prompt per line"),
    (_line(prompt=[]), "invalid_request", "empty prompt"),
    (_line(prompt=""), "invalid_request", "empty prompt"),
    (_line(prompt=[5, VOCAB]), "invalid_request", "body.prompt[1]: token id 2048 is out of range"),
    (_line(prompt=[5, 1.0]), "invalid_request", "body.prompt[1]"),
    (_line(prompt=[5] * 60, max_tokens=10), CONTEXT_LENGTH_EXCEEDED, "60 prompt tokens + max_tokens 10 = 70"),
    (_line(prompt=[5] * 60), CONTEXT_LENGTH_EXCEEDED, "over-long prompt"),  # the default 16 does not fit
    (_line(prompt=[5] * MAX_LEN), CONTEXT_LENGTH_EXCEEDED, "over-long prompt"),
    (_line(prompt=[5], stop_token_ids=[VOCAB]), "invalid_request", "body.stop_token_ids[0]"),
    (_line(url="/v1/chat/completions", messages=[]), "invalid_request", "body.messages"),
    (_line(url="/v1/chat/completions", messages=[{"content": "x"}]), "invalid_request", "body.messages[0].role"),
    (_line(url="/v1/chat/completions", messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     "invalid_request", "body.messages[0].content[0]"),
])
def test_bad_lines_give_error_records(chat_codec, line, code, field):
    e = parse_line(line, 7, chat_codec, VOCAB, MAX_LEN)
    assert isinstance(e, ErrorRecord) and e.code == code and field in e.message, e
    assert e.message.startswith("line 7: ")
    assert e.custom_id == ("r" if '"custom_id"' in line else "line-7")
    rec = e.record()
    assert rec["response"] is None and rec["error"] == {"code": code, "message": e.message}


def test_read_requests_in_order_with_errors(chat_codec, tmp_path):
    lines = [_line("a", prompt="hello"), "{torn", "", _line("b", prompt=[5], temperature=-1),
             _line(None, prompt=[5]), _line("a", prompt=[5]), _line("c", prompt=[5] * 70),
             _line("d", url="/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], max_tokens=3)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    got = list(read_requests(path, chat_codec, VOCAB, MAX_LEN))
    assert [(type(x).__name__, x.id if isinstance(x, Request) else x.custom_id) for x in got] == [
        ("Request", "a"), ("ErrorRecord", "line-2"), ("ErrorRecord", "b"), ("ErrorRecord", "line-5"),
        ("ErrorRecord", "a"), ("ErrorRecord", "c"), ("Request", "d")]
    assert got[4].code == DUPLICATE_CUSTOM_ID and "line 1" in got[4].message
    assert got[5].code == CONTEXT_LENGTH_EXCEEDED


# ------------------------------------------------------------------------------------------ records, writer


def test_result_records(chat_codec):
    chat = parse_line(_line("c", url="/v1/chat/completions", messages=[{"role": "user", "content": "hi"}],
                            max_tokens=4, return_token_ids=True), 1, chat_codec, VOCAB, MAX_LEN)
    rec = result_record(chat, [5, 6], "ok", "length", extra={"accepted_per_step": 1.5}, created=7)
    assert rec["custom_id"] == "c" and rec["error"] is None and rec["id"].startswith("batch_req_")
    resp = rec["response"]
    assert resp["status_code"] == 200 and resp["request_id"]
    body = resp["body"]
    assert body["object"] == "chat.completion" and body["model"] == "demo" and body["created"] == 7
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["token_ids"] == [5, 6]
    assert body["prompt_token_ids"] == list(chat.prompt_ids)
    n = len(chat.prompt_ids)
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 2, "total_tokens": n + 2}
    assert body["glmjax"] == {"accepted_per_step": 1.5}
    comp = parse_line(_line("t", prompt=[5]), 1, chat_codec, VOCAB, MAX_LEN)
    body = result_record(comp, [7], "x", "stop", stop_reason="\n")["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "x"
    assert "token_ids" not in body["choices"][0] and "glmjax" not in body
    json.dumps(body)
    assert error_record("z", "server_error", "boom")["error"] == {"code": "server_error", "message": "boom"}


def test_writer_resumes_after_a_torn_line(chat_codec, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([_line("a", prompt=[5]), _line("b", prompt=[6]), _line("a", prompt=[7]),
                              _line("c", prompt=[8])]) + "\n")
    reqs = list(read_requests(inp, chat_codec, VOCAB, MAX_LEN))
    with BatchWriter(out) as w:
        assert len(w.done_ids()) == 0
        w.write(reqs[2].record())  # the duplicate's error, written before "a" finished
        w.write(result_record(reqs[1], [1], "", "stop"))
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"id": "batch_req_x", "custom_id": "c", "resp')  # killed mid-write of "c"
    with BatchWriter(out) as w:
        assert out.read_bytes() == whole  # the torn line is gone
        done = w.done_ids()
        assert "b" in done and "a" not in done and "c" not in done and done.duplicates == {"a": 1}
        rest = list(read_requests(inp, chat_codec, VOCAB, MAX_LEN, done=done))
        assert [x.id for x in rest] == ["a", "c"]  # "a" is still owed; its duplicate's error is not repeated
        for r in rest:
            w.write(result_record(r, [2], "", "length"))
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == ["a", "a", "b", "c"]
    with BatchWriter(out) as w:
        assert list(read_requests(inp, chat_codec, VOCAB, MAX_LEN, done=w.done_ids())) == []


def test_writer_refuses_a_file_that_is_not_batch_output(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    with pytest.raises(InputError, match="line 1"):
        BatchWriter(other)
    assert other.read_text() == "my notes\n"
