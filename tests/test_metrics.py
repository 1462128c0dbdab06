"""Training metrics: the JSONL log (NaN -> null, torn last line, resume), TensorBoard events, the loss plot,
the progress line in non-TTY mode, the divergence check and MoE imbalance."""

import io
import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.train.metrics import (
    MetricsWriter,
    NonFiniteError,
    Progress,
    check_finite,
    format_duration,
    moe_imbalance,
    plot_losses,
    read_metrics,
)

# ---------------------------------------------------------------------------------------------------------
# metrics.jsonl


def test_jsonl_round_trip_nan_and_scalar_types(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.log(1, {"train/loss": 2.5, "train/lm_loss": np.float32(2.25), "train/mtp_loss/1": jnp.float32(3.0),
                       "train/grad_norm": math.nan, "val/loss": np.inf, "train/tokens": np.int64(4096)})
        writer.log(np.int32(2), {"train/loss": jnp.asarray(2.0, jnp.bfloat16)})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: other readers choke on them
    assert [json.loads(line)["step"] for line in text.splitlines()] == [1, 2]

    first, second = read_metrics(tmp_path / "metrics.jsonl")
    assert list(first)[:2] == ["step", "time"] and isinstance(first["time"], float)
    assert first["train/loss"] == 2.5 and first["train/lm_loss"] == 2.25 and first["train/mtp_loss/1"] == 3.0
    assert first["train/grad_norm"] is None and first["val/loss"] is None and first["train/tokens"] == 4096.0
    assert second == {"step": 2, "time": second["time"], "train/loss": 2.0}
    assert read_metrics(tmp_path) == [first, second]  # a run directory works too


def test_torn_last_line_is_dropped_and_resume_appends(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.log(1, {"train/loss": 3.0})
        writer.log(2, {"train/loss": 2.0})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "time": 17.0, "train/lo')  # a crash mid-write
    assert [r["step"] for r in read_metrics(path)] == [1, 2]

    # Resume: the torn line is cut off, so the new record is not glued onto it.
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.log(3, {"train/loss": 1.5})
    assert [(r["step"], r["train/loss"]) for r in read_metrics(path)] == [(1, 3.0), (2, 2.0), (3, 1.5)]
    assert all(json.loads(line) for line in path.read_text().splitlines())

    # A complete record that only lost its newline is kept.
    path.write_text(path.read_text() + '{"step": 4, "time": 1.0, "train/loss": 1.25}')
    assert read_metrics(path)[-1]["step"] == 4
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.log(5, {"train/loss": 1.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]


def test_bad_middle_line_and_bad_values_raise(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "time": 0.0}\ngarbage\n{"step": 2, "time": 0.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)
    with MetricsWriter(tmp_path / "run", tensorboard=False) as writer:
        with pytest.raises(TypeError, match="train/loss"):
            writer.log(1, {"train/loss": np.ones(3)})
        with pytest.raises(ValueError, match="step"):
            writer.log(1, {"step": 1.0})
    with pytest.raises(RuntimeError, match="closed"):
        writer.log(2, {"train/loss": 1.0})


def test_drop_superseded_keeps_the_resumed_run(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in (1, 2, 3, 4):
            writer.log(step, {"train/loss": 10.0 + step})
        writer.log(4, {"val/loss": 9.0})  # same step, another group: not a restart
    with MetricsWriter(tmp_path, tensorboard=False) as writer:  # resumed from the step-2 checkpoint
        writer.log(3, {"train/loss": 1.0})
    assert len(read_metrics(tmp_path)) == 6
    kept = read_metrics(tmp_path, drop_superseded=True)
    assert [(r["step"], r.get("train/loss")) for r in kept] == [(1, 11.0), (2, 12.0), (3, 1.0)]


# ---------------------------------------------------------------------------------------------------------
# TensorBoard


def _read_events(directory):
    """Every Event in the TFRecord event files under `directory` (length, crc, payload, crc per record)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.log(10, {"train/loss": 2.5, "train/grad_norm": math.nan})
        writer.log(20, {"train/loss": 2.0, "moe/imbalance/layer_3": 1.5})
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert files and all(f.stat().st_size > 0 for f in files)

    scalars = {(v.tag, e.step): v.simple_value for e in _read_events(tmp_path / "tensorboard")
               for v in e.summary.value}
    assert scalars == {("train/loss", 10): 2.5, ("train/loss", 20): 2.0, ("moe/imbalance/layer_3", 20): 1.5}

    try:  # TensorBoard's own reader, where TensorBoard is installed
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(s.step, s.value) for s in acc.Scalars("train/loss")] == [(10, 2.5), (20, 2.0)]


def test_tensorboard_resume_marks_purge_step(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.log(5, {"train/loss": 1.0})
    with MetricsWriter(tmp_path) as writer:
        writer.log(3, {"train/loss": 0.5})
    starts = [e.step for e in _read_events(tmp_path / "tensorboard") if e.HasField("session_log")]
    assert 3 in starts  # TensorBoard drops the earlier run's events at steps >= 3


# ---------------------------------------------------------------------------------------------------------
# The plot


def test_plot_losses_writes_a_png(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 41):
            loss = 12.0 / step**0.7
            writer.log(step, {"train/loss": loss, "train/lm_loss": 0.9 * loss, "train/mtp_loss/1": 1.1 * loss,
                              "train/moe_aux_loss": 1e-3, "train/lr": 1e-4})
            if step % 10 == 0:
                writer.log(step, {"val/loss": loss * 1.05})
    png = plot_losses(tmp_path / "metrics.jsonl", tmp_path / "plots" / "loss.png")
    assert png == tmp_path / "plots" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert plot_losses(empty, empty / "loss.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------------------
# Progress


class FakeClock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def test_progress_non_tty_prints_plain_lines_with_rate_and_eta():
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(100, start_step=0, interval_s=10.0, window=4, file=out, clock=clock)
    clock.t = 60.0  # the first step includes compilation: it must not drag the rate down
    progress.update(1, loss=5.0, tokens=1000)
    assert progress.tokens_per_second() is None and progress.eta_seconds() is None
    for step in range(2, 31):
        clock.t += 0.5
        progress.update(step, loss=5.0 - step / 10, tokens=1000)
    assert progress.tokens_per_second() == pytest.approx(2000.0)
    assert progress.eta_seconds() == pytest.approx(70 * 0.5)
    progress.close()
    progress.close()

    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()  # no terminal redraws
    assert lines[0].startswith("step 1/100 (1.0%) | loss 5.0000 | ? tok/s | ETA ?")
    # steps 2..30 span 14.5 s at one line per 10 s, then the final line at close
    assert len(lines) == 3
    assert lines[1].startswith("step 21/100") and "2,000 tok/s" in lines[1] and "ETA 0:00:40" in lines[1]
    assert lines[-1].startswith("step 30/100 (30.0%) | loss 2.0000 | 2,000 tok/s | ETA 0:00:35")


def test_progress_disabled_and_resumed():
    out, clock = io.StringIO(), FakeClock()
    with Progress(10, enabled=False, file=out, clock=clock) as progress:
        progress.update(1, loss=1.0, tokens=10)
    assert out.getvalue() == ""
    with Progress(10, start_step=8, file=out, clock=clock) as progress:
        clock.t = 1.0
        progress.update(9, loss=jnp.float32(0.5), tokens=10)
    assert out.getvalue().startswith("step 9/10 (90.0%) | loss 0.5000")


def test_progress_on_a_terminal_uses_rich():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    with Progress(4, file=out) as progress:
        for step in range(1, 5):
            progress.update(step, loss=1.0, tokens=8)
    assert "4/4" in out.getvalue() and "tok/s" in out.getvalue()


def test_format_duration():
    assert format_duration(None) == "?" and format_duration(math.inf) == "?"
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(3 * 86400 + 3725) == "3d 1:02:05"


# ---------------------------------------------------------------------------------------------------------
# check_finite, moe_imbalance


def test_check_finite_names_the_metric_and_step():
    check_finite({"train/loss": 2.0, "train/grad_norm": np.float32(1.0), "moe/imbalance/max": math.nan}, 5)
    with pytest.raises(NonFiniteError, match=r"train/loss=nan.* at step 7") as info:
        check_finite({"train/loss": jnp.float32(jnp.nan), "train/grad_norm": 1.0, "train/lr": 1e-4}, 7)
    assert info.value.step == 7 and list(info.value.values) == ["train/loss"]
    with pytest.raises(NonFiniteError, match=r"train/grad_norm=inf"):
        check_finite({"train/loss": 2.0, "train/grad_norm": math.inf}, 8)
    # names= replaces the default set; absent names are ignored
    check_finite({"train/loss": math.nan, "custom": 1.0}, 9, names=["custom", "missing"])
    with pytest.raises(NonFiniteError, match="custom"):
        check_finite({"custom": -math.inf}, 9, names=["custom"])


def test_moe_imbalance():
    load = np.array([[5, 5, 5, 5], [16, 0, 0, 4], [0, 0, 0, 0]], dtype=np.int32)
    out = moe_imbalance(load)
    assert set(out) == {"moe/imbalance/layer_0", "moe/imbalance/layer_1", "moe/imbalance/layer_2",
                        "moe/imbalance/max"}
    assert out["moe/imbalance/layer_0"] == 1.0 and out["moe/imbalance/layer_1"] == 3.2
    assert math.isnan(out["moe/imbalance/layer_2"]) and out["moe/imbalance/max"] == 3.2
    assert all(type(v) is float for v in out.values())

    named = moe_imbalance(jnp.asarray(load[:2]), layer_ids=[3, 4])
    assert named == {"moe/imbalance/layer_3": 1.0, "moe/imbalance/layer_4": 3.2, "moe/imbalance/max": 3.2}
    with pytest.raises(ValueError, match="layers, experts"):
        moe_imbalance(np.ones(4))
    with pytest.raises(ValueError, match="layer_ids"):
        moe_imbalance(load, layer_ids=[1])
