"""A batch job: OpenAI batch file in, results out, through the engine (what `serve.py --input --output` runs).

Lines are read as the engine asks for requests, so a large file is never held whole. A line that cannot be
served gets an error record right away and the rest run; every result is written (and fsynced) as soon as
its request finishes, so a job that stops loses nothing written, and running it again with the same output
file answers only what is missing.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from glmjax.errors import InputError
from glmjax.serve.batch_file import CONTEXT_LENGTH_EXCEEDED, BatchWriter, ErrorRecord, read_requests, result_record
from glmjax.serve.engine import Completion, Engine
from glmjax.serve.requests import Request


@dataclasses.dataclass
class BatchReport:
    """requests: answered with a result; errors: answered with an error record; skipped: answered by an earlier
    run; tokens: prompt and completion tokens of the results; seconds: wall time of the job; acceptance:
    histogram of tokens emitted per verification (1 + accepted drafts; empty without speculation)."""

    requests: int = 0
    errors: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    acceptance: Counter = dataclasses.field(default_factory=Counter)

    def add(self, c: Completion) -> None:
        self.requests += 1
        self.prompt_tokens += len(c.request.prompt_ids)
        self.completion_tokens += len(c.tokens)
        self.acceptance.update(1 + a for a in c.accepted)

    def lines(self) -> list[str]:
        rate = self.completion_tokens / self.seconds if self.seconds else 0.0
        out = [f"requests: {self.requests} answered, {self.errors} errors, {self.skipped} already done",
               f"tokens: {self.prompt_tokens} prompt, {self.completion_tokens} completion in {self.seconds:.1f} s "
               f"({rate:.1f} completion tokens/s)"]
        if self.acceptance:
            n = sum(self.acceptance.values())
            mean = sum(k * v for k, v in self.acceptance.items()) / n
            out.append(f"acceptance length: {mean:.2f} tokens per verification ({n} verifications)")
            width = max(self.acceptance.values())
            for k in range(1, max(self.acceptance) + 1):
                v = self.acceptance.get(k, 0)
                out.append(f"  {k:2d} {'#' * round(40 * v / width):<40s} {v}")
        return out


def count_lines(path: str | Path) -> int:
    """Non-blank lines of a file (the progress bar's total)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def run_batch(engine: Engine, input_path: str | Path, output_path: str | Path, *, model_name: str,
              return_token_ids: bool = False, progress=None) -> BatchReport:
    """Runs every request of `input_path` not yet answered in `output_path`. progress: a callable taking the
    number of lines answered so far, earlier runs included (a progress bar's update), or None."""
    report = BatchReport()
    cfg = engine.model.config
    t0 = time.perf_counter()
    with BatchWriter(output_path) as writer:
        done = writer.done_ids()
        report.skipped = len(done)

        def answered():
            if progress is not None:
                progress(report.skipped + report.requests + report.errors)

        def requests() -> Iterator[Request]:
            for item in read_requests(input_path, engine.codec, cfg.vocab_size, engine.config.max_len, done=done):
                if isinstance(item, Request):
                    try:
                        engine.check(item)
                    except InputError as e:
                        item = ErrorRecord(item.id, 0, CONTEXT_LENGTH_EXCEEDED, str(e))
                if isinstance(item, ErrorRecord):
                    writer.write(item.record())
                    report.errors += 1
                    answered()
                    continue
                if return_token_ids and not item.params.return_token_ids:
                    item = dataclasses.replace(item, params=dataclasses.replace(item.params, return_token_ids=True))
                yield item

        for c in engine.run(requests()):
            extra = {"steps": c.steps, "seconds": round(c.seconds, 4)}
            if c.accepted:
                extra["acceptance_length"] = round(c.acceptance_length, 4)
            writer.write(result_record(c.request, c.tokens, c.text, c.finish_reason, stop_reason=c.stop_reason,
                                       model=model_name, extra=extra))
            report.add(c)
            answered()
    report.seconds = time.perf_counter() - t0
    return report
