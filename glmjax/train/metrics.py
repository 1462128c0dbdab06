"""What a user sees during training: a metrics log, TensorBoard scalars, a loss plot and a progress bar.

- `MetricsWriter` appends one JSON object per logged step to `<dir>/metrics.jsonl`
  (`{"step": 100, "time": 1767225600.0, "train/loss": 2.31, ...}`) and writes the same scalars to
  TensorBoard event files under `<dir>/tensorboard` through tensorboardX. The JSONL file is the record
  of truth: plain text, greppable, readable without TensorBoard (`read_metrics`), and it survives a crash
  mid-write (a torn last line is dropped). JSON has no NaN, so non-finite values are written as null.
- `plot_losses` draws the loss curves from that file into a PNG (matplotlib's Agg renderer, no display).
- `Progress` is the progress bar: step, loss, tokens/s and ETA; a rich bar on a terminal, one plain line
  every `interval_s` seconds otherwise (CI and cluster logs, where redraws turn into garbage).
- `check_finite` stops a run whose loss or gradient norm went NaN/inf, before a bad state is checkpointed.
- `moe_imbalance` turns per-layer expert loads into max/mean imbalance scalars to log.

Resume: a `MetricsWriter` opened on an existing directory appends to the same file. Steps after the
restored checkpoint were logged by the crashed run and are logged again by the resumed one; TensorBoard
drops the old ones (the writer passes the first step it logs as tensorboardX's `purge_step`), and
`read_metrics(..., drop_superseded=True)` gives the same view of the JSONL file (the plot uses it).

Multi-host: only one process (`jax.process_index() == 0`) should write metrics and show progress; the
caller decides, these classes do not call into JAX.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "time")


def _to_float(name: str, value: Any) -> float:
    """A python float from a python/numpy/jax scalar (or any one-element array); the error names the metric."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # an object numpy cannot read: say which metric it was
        raise TypeError(f"metric {name!r}: cannot convert {type(value).__name__} to a float") from exc
    # Strings are refused although float("2.5") works: a string here is a bug in the caller. The dtype is
    # not checked otherwise, because bfloat16 (an ml_dtypes type, common in jax) is not an np.number.
    if array.size == 1 and array.dtype.kind not in "USO":
        try:
            return float(array.reshape(()))
        except (TypeError, ValueError):
            pass
    raise TypeError(f"metric {name!r}: expected a numeric scalar, got dtype {array.dtype} shape {array.shape}")


# ---------------------------------------------------------------------------------------------------------
# The metrics log: metrics.jsonl + TensorBoard


class MetricsWriter:
    """Logs scalars per step to `<directory>/metrics.jsonl` and (optionally) TensorBoard.

    >>> with MetricsWriter("runs/exp1") as writer:
    ...     writer.log(step, {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr})

    Each `log` call writes one line and flushes Python's buffer, so a crash loses at most the line being
    written; `flush` additionally fsyncs (call it before a checkpoint is committed). Opening a directory
    that already has a metrics.jsonl continues it; a torn last line from a crash is cut off first so the
    next record starts on a line of its own.
    """

    def __init__(self, directory: str | os.PathLike[str], *, tensorboard: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.directory / JSONL_NAME
        self.tensorboard_dir = self.directory / TENSORBOARD_DIR
        _repair_tail(self.jsonl_path)
        self._file: IO[str] | None = open(self.jsonl_path, "a", encoding="utf-8")  # closed by close()
        self._tensorboard = tensorboard
        self._tb: Any = None  # tensorboardX.SummaryWriter, created at the first log (it needs the first step)
        if tensorboard:
            # Import now so a missing package fails at startup, not at the first logged step hours in.
            import tensorboardX  # noqa: F401

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append `metrics` (name -> scalar) for `step`. Non-finite values: null in JSON, skipped in TensorBoard."""
        if self._file is None:
            raise RuntimeError(f"MetricsWriter({self.directory}) is closed")
        step = int(step)
        now = time.time()
        values: dict[str, float] = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or name in _RESERVED:
                raise ValueError(f"metric name {name!r}: must be a string other than {_RESERVED}")
            values[name] = _to_float(name, value)
        record: dict[str, Any] = {"step": step, "time": now}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        # One write per record: a crash can tear only the last line, which readers drop.
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tensorboard:
            writer = self._tensorboard_writer(step)
            for name, value in values.items():
                # Skipped rather than written: an inf stretches TensorBoard's y axis until the curve is flat.
                if math.isfinite(value):
                    writer.add_scalar(name, value, global_step=step, walltime=now)

    def _tensorboard_writer(self, first_step: int) -> Any:
        if self._tb is None:
            from tensorboardX import SummaryWriter

            # purge_step: on resume, TensorBoard hides the crashed run's events at steps >= the first step
            # logged now (they are about to be logged again). On a fresh run there is nothing to hide.
            self._tb = SummaryWriter(logdir=str(self.tensorboard_dir), purge_step=first_step, flush_secs=30)
        return self._tb

    def flush(self) -> None:
        """Push everything logged so far to disk (fsync'd JSONL, TensorBoard events)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close; a second call does nothing."""
        if self._file is None:
            return
        self.flush()
        self._file.close()
        self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _repair_tail(path: Path) -> None:
    """Cut a torn (unterminated, unparsable) last line off `path`, or terminate a complete one.

    Without this, the first record appended after a crash would be glued onto the torn line and turn it
    into a corrupt line in the middle of the file."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan back for the previous newline; lines are small, the file may not be.
        start, pos = 0, size
        while pos > 0:
            pos = max(0, pos - 65536)
            f.seek(pos)
            newline = f.read(size - pos).rfind(b"\n")
            if newline >= 0:
                start = pos + newline + 1
                break
        f.seek(start)
        if _parse_line(f.read(size - start)) is not None:
            f.seek(size)
            f.write(b"\n")  # complete record, only its newline was lost
        else:
            f.truncate(start)


def _parse_line(line: bytes | str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "step" in record else None


def read_metrics(path: str | os.PathLike[str], *, drop_superseded: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (or of the one in directory `path`), in file order.

    Non-finite values come back as None. A torn last line (a crash mid-write) is dropped; a bad line
    anywhere else raises ValueError naming the line, since it means something other than a crash (two
    writers on one file, say). drop_superseded: when the step goes backwards (a resumed run re-logging
    the steps after its checkpoint), drop the earlier records at that step and after, as TensorBoard does,
    so each step keeps only the records of the latest run that logged it. (A resumed run that starts by
    re-logging exactly the crashed run's last step cannot be told apart from it; both records are kept.)"""
    path = Path(path)
    if path.is_dir():
        path = path / JSONL_NAME
    lines = path.read_text(encoding="utf-8").split("\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse_line(line)
        if record is None:
            if number == len(lines):  # no newline after it: the write was torn by a crash
                break
            raise ValueError(f"{path}:{number}: not a metrics record: {line[:80]!r}")
        records.append(record)
    if drop_superseded:
        kept: list[dict[str, Any]] = []
        for record in records:
            # A step below the last one starts a resumed run. Equal steps are one run logging several
            # groups (train, then val) at one step, so they do not (kept is sorted: kept[-1] is the max).
            if kept and record["step"] < kept[-1]["step"]:
                while kept and kept[-1]["step"] >= record["step"]:
                    kept.pop()
            kept.append(record)
        records = kept
    return records


# ---------------------------------------------------------------------------------------------------------
# The loss plot


def _is_loss_term(name: str) -> bool:
    """The second panel's curves: every train/*loss* term but the total, and every MTP depth's loss."""
    if name in ("train/loss", "val/loss"):
        return False
    return (name.startswith("train/") and "loss" in name) or "/mtp_loss/" in name


def _series(records: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(name)
        if value is not None:
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def plot_losses(metrics_jsonl: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> Path:
    """Write a PNG of the loss curves logged in `metrics_jsonl` (a file, or a run directory); returns its path.

    Top panel: train/loss and val/loss against step. Bottom panel (when any were logged): the loss terms
    (train/lm_loss, train/mtp_loss/<k>, aux losses, ...). A panel's y axis is logarithmic when its positive
    values span more than 10x, so early and late training are both readable."""
    # matplotlib is imported here (not at module import) and used through an explicit Agg canvas, never
    # pyplot: no display is needed and the caller's own matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_jsonl, drop_superseded=True)
    names = list(dict.fromkeys(k for r in records for k in r if k not in _RESERVED))
    panels = [[n for n in ("train/loss", "val/loss") if n in names], sorted(n for n in names if _is_loss_term(n))]
    panels = [p for p in panels if p] or [[]]  # an empty log still gives an (empty) figure

    fig = Figure(figsize=(10, 4 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        low, high = math.inf, 0.0
        for name in panel:
            steps, values = _series(records, name)
            style = {"marker": "o", "markersize": 3} if name.startswith("val/") or len(steps) < 50 else {}
            ax.plot(steps, values, label=name, linewidth=1.2, **style)
            positive = [v for v in values if v > 0]
            if positive:
                low, high = min(low, min(positive)), max(high, max(positive))
            if len(positive) < len(values):
                low = 0.0  # a zero or negative value cannot go on a log axis
        if low > 0 and high / low > 10:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, which="both", alpha=0.3)
        if panel:
            ax.legend(loc="upper right", fontsize="small")
    axes[0].set_title(f"losses: {Path(metrics_jsonl)}")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, format="png", dpi=100)
    return png_path


# ---------------------------------------------------------------------------------------------------------
# The progress bar


def format_duration(seconds: float | None) -> str:
    """H:MM:SS (with a day count past 24 h); '?' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


class Progress:
    """Training progress on stderr: step/total, loss, tokens/s over recent steps, and ETA.

    >>> progress = Progress(cfg.total_steps, start_step=restored_step, enabled=jax.process_index() == 0)
    >>> for step in range(restored_step + 1, cfg.total_steps + 1):
    ...     progress.update(step, loss=loss, tokens=tokens_in_this_step)
    >>> progress.close()

    `tokens` is the number of tokens processed since the previous `update` (the global batch's tokens when
    called every step). Rates come from the last `window` updates. The time up to the first update is never
    counted: it includes compiling the train step, which would make the early estimates far too slow.
    On a terminal this is a rich progress bar; when `file` is not a TTY (CI, `> log.txt`, a cluster's log
    collector) it prints one plain line at the first update, then at most every `interval_s` seconds, and
    a last one at `close`. `clock` is injectable for tests.
    """

    def __init__(self, total_steps: int, *, start_step: int = 0, enabled: bool = True, window: int = 20,
                 interval_s: float = 30.0, file: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window < 1:
            raise ValueError(f"Progress: window must be >= 1, got {window}")
        self.total_steps = int(total_steps)
        self.enabled = enabled
        self.interval_s = interval_s
        self._file = file if file is not None else sys.stderr
        self._clock = clock
        # (time, step, tokens since the previous entry); the oldest entry is only the window's start time.
        self._window: deque[tuple[float, int, float]] = deque(maxlen=window + 1)
        self._step = int(start_step)
        self._loss: float | None = None
        self._last_print: float | None = None
        self._printed_step: int | None = None
        self._start = clock()
        self._rich: Any = None
        self._task: Any = None
        if enabled and _isatty(self._file):
            self._start_rich(start_step)

    # -- estimates ---------------------------------------------------------------------------------------

    def tokens_per_second(self) -> float | None:
        """Tokens per second over the window; None until two updates have been seen."""
        if len(self._window) < 2:
            return None
        elapsed = self._window[-1][0] - self._window[0][0]
        tokens = sum(entry[2] for entry in list(self._window)[1:])
        return tokens / elapsed if elapsed > 0 else None

    def eta_seconds(self) -> float | None:
        """Seconds until total_steps at the window's step rate; None until two updates have been seen."""
        if len(self._window) < 2:
            return None
        elapsed = self._window[-1][0] - self._window[0][0]
        steps = self._window[-1][1] - self._window[0][1]
        if elapsed <= 0 or steps <= 0:
            return None
        return max(0, self.total_steps - self._step) * elapsed / steps

    # -- updates -----------------------------------------------------------------------------------------

    def update(self, step: int, *, loss: float | None = None, tokens: float = 0) -> None:
        """Record that `step` finished, with its loss (None: keep showing the last one) and token count."""
        now = self._clock()
        self._step = int(step)
        if loss is not None:
            self._loss = _to_float("loss", loss)
        self._window.append((now, self._step, float(tokens)))
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=self._step, **self._fields())
        elif self._last_print is None or now - self._last_print >= self.interval_s:
            self._print_line(now)

    def close(self) -> None:
        """Stop the bar (or print the final plain line); a second call does nothing."""
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        elif self.enabled and self._window and self._printed_step != self._step:
            self._print_line(self._clock())
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- rendering ---------------------------------------------------------------------------------------

    def _fields(self) -> dict[str, str]:
        rate = self.tokens_per_second()
        return {
            "loss": "?" if self._loss is None else f"{self._loss:.4f}",
            "tok_s": "?" if rate is None else f"{rate:,.0f}",
            "eta": format_duration(self.eta_seconds()),
        }

    def line(self) -> str:
        """The plain progress line, e.g. 'step 120/1000 (12.0%) | loss 2.3456 | 51,200 tok/s | ETA 0:14:40 | ...'."""
        fields = self._fields()
        elapsed = format_duration(self._clock() - self._start)
        percent = 100.0 * self._step / self.total_steps if self.total_steps else 100.0
        return (f"step {self._step}/{self.total_steps} ({percent:.1f}%) | loss {fields['loss']} | "
                f"{fields['tok_s']} tok/s | ETA {fields['eta']} | elapsed {elapsed}")

    def _print_line(self, now: float) -> None:
        print(self.line(), file=self._file, flush=True)
        self._last_print = now
        self._printed_step = self._step

    def _start_rich(self, start_step: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._rich = RichProgress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tok_s]} tok/s"),
            TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn(),
            console=Console(file=self._file), refresh_per_second=2)
        self._task = self._rich.add_task("train", total=self.total_steps, completed=start_step, **self._fields())
        self._rich.start()


def _isatty(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


# ---------------------------------------------------------------------------------------------------------
# Divergence check


class NonFiniteError(RuntimeError):
    """A watched metric (loss, grad norm) is NaN or inf: training has diverged and must stop.

    `step` is the step it happened at and `values` maps each offending metric to its value. The loop
    stops without saving, so the last checkpoint on disk is the last good one."""

    def __init__(self, step: int, values: Mapping[str, float]) -> None:
        self.step = int(step)
        self.values = dict(values)
        listed = ", ".join(f"{name}={value}" for name, value in self.values.items())
        super().__init__(f"non-finite {listed} at step {self.step}: training diverged; not checkpointing "
                         f"this state (resume from the last good checkpoint, e.g. with a lower learning rate)")


def _is_watched(name: str) -> bool:
    return "loss" in name or "grad_norm" in name


def check_finite(metrics: Mapping[str, Any], step: int, *, names: Iterable[str] | None = None) -> None:
    """Raise NonFiniteError if a loss or grad norm in `metrics` is NaN/inf.

    Watched by default: every metric whose name contains "loss" or "grad_norm" ("train/loss",
    "train/mtp_loss/1", "train/grad_norm", ...); `names` replaces that set (names absent from `metrics`
    are ignored). Values may be python, numpy or jax scalars (a jax value is fetched from the device)."""
    watched = [n for n in metrics if _is_watched(n)] if names is None else [n for n in names if n in metrics]
    bad = {name: value for name in watched if not math.isfinite(value := _to_float(name, metrics[name]))}
    if bad:
        raise NonFiniteError(step, bad)


# ---------------------------------------------------------------------------------------------------------
# MoE load balance


def moe_imbalance(load: Any, *, layer_ids: Iterable[int] | None = None) -> dict[str, float]:
    """Per-layer expert-load imbalance, max load / mean load, from loads [L, E] (tokens routed per expert).

    Returns {"moe/imbalance/layer_<i>": ..., "moe/imbalance/max": ...}. 1.0 is perfectly balanced; E
    means one expert took every token. `i` is the row index unless `layer_ids` names the model layer of
    each row (GLM-5.2's first layers are dense, so row 0 is layer `first_k_dense_replace`). A layer that
    routed no tokens has no imbalance: NaN (logged as null)."""
    load = np.asarray(load, dtype=np.float64)
    if load.ndim != 2 or load.shape[1] == 0:
        raise ValueError(f"moe_imbalance: expected loads [layers, experts], got shape {load.shape}")
    ids = list(range(load.shape[0])) if layer_ids is None else [int(i) for i in layer_ids]
    if len(ids) != load.shape[0]:
        raise ValueError(f"moe_imbalance: {len(ids)} layer_ids for {load.shape[0]} layers of loads")
    mean = load.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(mean > 0, load.max(axis=1) / mean, np.nan)
    out = {f"moe/imbalance/layer_{i}": float(r) for i, r in zip(ids, ratio, strict=True)}
    finite = ratio[np.isfinite(ratio)]
    out["moe/imbalance/max"] = float(finite.max()) if finite.size else math.nan
    return out
