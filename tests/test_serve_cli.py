"""serve.py end to end: the OpenAI batch file round trip (results, error records for bad lines), an
interrupted job resumed, and the default demo run."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import glmjax
import serve
from glmjax.serve import greedy_decode_reference
from glmjax.serve.engine import Engine
from tests.conftest import GOLDEN

FIXTURE = GOLDEN / "indexshare_freq"  # no tokenizer.json: token-id prompts
ARGS = ["--checkpoint", str(FIXTURE), "--slots", "2", "--max-len", "40", "--prefill-chunk", "16",
        "--num-speculative-tokens", "2"]


def line(custom_id, prompt, **body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"model": "fixture", "prompt": prompt, "max_tokens": 6, "temperature": 0, **body}})


def good_lines(n=4):
    rng = np.random.default_rng(1)
    return [line(f"ok-{i}", [int(t) for t in rng.integers(2, 150, 3 + 5 * i)]) for i in range(n)]


def read(path):
    return {r["custom_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def run(capsys, *argv):
    rc = serve.main([*ARGS, *argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


@pytest.fixture(scope="module")
def want():
    model = glmjax.load_pretrained(FIXTURE, dtype=jnp.float32)  # serve.py computes in float32 by default
    prompts = [json.loads(s)["body"]["prompt"] for s in good_lines()]
    return dict(zip([f"ok-{i}" for i in range(4)], greedy_decode_reference(model, prompts, 6), strict=True))


def test_batch_file_round_trip_with_bad_lines(capsys, tmp_path, want):
    lines = good_lines()
    lines[1:1] = ["{not json", line("bad-temp", [5, 6], temperature=-1), line("too-long", list(range(2, 40))),
                  json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": [5]}}),
                  line("text-no-tokenizer", "hello")]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = run(capsys, "--input", str(src), "--output", str(dst), "--return-token-ids", "--prefill-batch", "2")
    got = read(dst)
    assert len(got) == len(lines)
    for cid, tokens in want.items():
        body = got[cid]["response"]["body"]
        assert got[cid]["error"] is None and body["object"] == "text_completion"
        assert body["choices"][0]["token_ids"] == tokens
        assert body["usage"]["completion_tokens"] == len(tokens)
        assert body["glmjax"]["steps"] >= 1
    assert got["line-2"]["error"]["code"] == "invalid_json"
    assert "temperature" in got["bad-temp"]["error"]["message"]
    assert got["too-long"]["error"]["code"] == "context_length_exceeded"
    assert "custom_id" in got["line-5"]["error"]["message"]
    assert "tokenizer" in got["text-no-tokenizer"]["error"]["message"]
    assert "4 answered, 5 errors" in out and "acceptance length" in out


def test_an_interrupted_job_resumes_without_losing_or_repeating(capsys, monkeypatch, tmp_path, want):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(good_lines()) + "\n")
    real_run = Engine.run

    def killed_after_two(self, requests):
        for i, c in enumerate(real_run(self, requests)):
            if i == 2:
                raise KeyboardInterrupt  # the job dies while the third result is being written
            yield c

    monkeypatch.setattr(Engine, "run", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        serve.main([*ARGS, "--input", str(src), "--output", str(dst), "--return-token-ids"])
    first = read(dst)
    assert len(first) == 2
    with dst.open("a") as f:
        f.write('{"id": "batch_req_torn", "custom_')  # a record torn by the kill
    monkeypatch.setattr(Engine, "run", real_run)
    out = run(capsys, "--input", str(src), "--output", str(dst), "--return-token-ids")
    assert "2 already done" in out
    rows = dst.read_text().splitlines()
    got = read(dst)
    assert len(rows) == len(got) == 4  # each request once, the torn line gone
    assert all(got[c] == first[c] for c in first)  # what was written stays as written
    assert {c: r["response"]["body"]["choices"][0]["token_ids"] for c, r in got.items()} == want


def test_the_default_run_completes_python_with_the_demo_model(capsys):
    rc = serve.main(["--max-tokens", "12"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "def fibonacci(n):" in out and "acceptance length" in out and "completion tokens/s" in out
