"""Training checkpoints: model, optimizer, data position, RNG and metadata, one orbax step directory per save.

Layout of `CheckpointConfig.directory` (orbax's CheckpointManager; one directory per saved step):

    <directory>/<step>/model/       model variables (Params and the RouterBias buffers), orbax arrays
                      /optimizer/   optimizer state, orbax arrays
                      /data/        process_<i>-of-<n>.json: each JAX process's data iterator state
                      /rng/         rng.json: the PRNG key's raw key_data and its implementation
                      /meta/        meta.json: {"format", "step", "meta"}: the loop's config, metrics, ...

Arrays are stored as plain nested dicts of values ("stacks/0/.../weight"): `nnx.Variable` wrappers are
stripped on save and put back from the restore target, so a checkpoint does not depend on flax's Variable
classes and can be read without glmjax.

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only
after every item of every process is written (on object stores without rename, a `commit_success.txt`
marks completion instead). Step discovery ignores unfinished directories, so a crash or kill mid-save
leaves the previous step as the latest; leftover temporary directories are deleted when the next
Checkpointer opens the directory.

Async saves (`CheckpointConfig.async_save`): `save` returns once the arrays are copied to host memory,
so the loop may update (or donate) its device buffers right away; writing and finalising happen in a
background thread. `wait()` blocks until they are done; the next `save`, `restore` and `close` wait too.

Multi-host: every process calls every method (they synchronise internally). The data state is per
process (each host reads its own share of the documents), so each process writes its own JSON file and
restores it under the same process layout. Preemption: `PreemptionGuard` (below) turns SIGTERM/SIGINT
into a flag on a single host; with several hosts, the JAX preemption service (enabled by
`jax.distributed.initialize`) agrees on a step at which every host saves, seen through
`PreemptionGuard.stop(step)` and `Checkpointer.should_save(step)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from glmjax.errors import CheckpointError, ConfigError
from glmjax.train.sections import from_mapping

__all__ = ["CheckpointConfig", "Checkpointer", "FORMAT_VERSION", "PreemptionGuard", "Restored", "with_shardings"]

# Bumped when the layout above changes incompatibly; restore refuses other versions.
FORMAT_VERSION = 1
ITEMS: tuple[str, ...] = ("model", "optimizer", "data", "rng", "meta")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often training checkpoints are written.

    directory: the run's checkpoint directory (a local path or any path orbax/etils supports, e.g.
    gs://...); created if missing. save_every: save when step % save_every == 0 (steps count optimizer
    updates). keep: how many of the newest checkpoints to keep (older ones are deleted after a save);
    None keeps all. async_save: write in a background thread (see module docstring)."""

    directory: str | os.PathLike[str]
    save_every: int = 1000
    keep: int | None = 3
    async_save: bool = True

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ConfigError(f"CheckpointConfig.{field}: {why}, got {getattr(self, field)!r}")

        if not isinstance(self.directory, str | os.PathLike) or not os.fspath(self.directory):
            bad("directory", "must be a non-empty path")
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 1:
            bad("save_every", "must be an integer >= 1")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int)
                                      or self.keep < 1):
            bad("keep", "must be an integer >= 1 or None (keep all)")
        if not isinstance(self.async_save, bool):
            bad("async_save", "must be true or false")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CheckpointConfig:
        """From a config file's mapping; an unknown or missing field is an error naming it."""
        return from_mapping(cls, values)


@dataclasses.dataclass(frozen=True)
class Restored:
    """One restored checkpoint. model_state / opt_state have the structure (and Variable types) of the
    targets passed to `Checkpointer.restore`, with arrays placed by the targets' shardings; opt_state is
    None when no optimizer target was passed. data_state: this process's iterator state as saved; rng:
    the key as saved (a typed key, or a raw uint32 key), on the default device; meta: the loop's dict."""

    step: int
    model_state: Any
    opt_state: Any
    data_state: Any
    rng: jax.Array | None
    meta: dict[str, Any]


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _values(tree: Any) -> Any:
    """`tree` with every nnx.Variable replaced by its value: what is written, and the restore target."""
    return jax.tree.map(lambda v: v.get_value() if _is_variable(v) else v, tree, is_leaf=_is_variable)


def _arrays(tree: Any, what: str) -> Any:
    """What `save` writes for an array tree. An empty tree is refused here: orbax would fail on it only in
    its writer, after the step directory was begun."""
    values = _values(tree)
    if not jax.tree.leaves(values):
        raise ValueError(f"Checkpointer.save: {what} holds no arrays")
    return values


def _rewrap(target: Any, restored: Any) -> Any:
    """Puts restored values back into (copies of) the target's Variables; the target is left unchanged."""
    return jax.tree.map(lambda t, r: t.replace(r) if _is_variable(t) else r, target, restored,
                        is_leaf=_is_variable)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """A restore target: `abstract` (e.g. `nnx.state(nnx.eval_shape(...))`) with every leaf a
    ShapeDtypeStruct carrying its sharding. `shardings` is one Sharding for all leaves, or a tree with a
    Sharding per array or per Variable, as `sharding.param_shardings` and `optimizer_shardings` return."""
    def sds(s, leaf):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s)

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda leaf: sds(shardings, leaf), abstract)
    # shardings is a prefix of abstract: each Sharding stands where abstract has a Variable (or array).
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda leaf: sds(s, leaf), sub), shardings, abstract)


def _jsonable(value: Any, what: str) -> Any:
    """A JSON-only deep copy of `value` (numpy/JAX scalars and arrays become numbers and lists). Copying
    matters for async saves: the loop may change its dicts while the background thread writes them."""
    def default(x):
        if isinstance(x, np.ndarray | np.generic | jax.Array):
            return np.asarray(x).tolist()
        raise TypeError(f"{type(x).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(value, default=default))
    except (TypeError, ValueError) as e:
        raise TypeError(f"Checkpointer.save: {what}: {e}") from e


def _rng_record(rng: jax.Array | None) -> dict[str, Any] | None:
    """The key as JSON: its raw uint32 key_data (exact) and, for a typed key, the implementation name."""
    if rng is None:
        return None
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(rng) if typed else rng)
    if data.dtype != np.uint32:
        raise TypeError(f"Checkpointer.save: rng: expected a PRNG key, got an array of {data.dtype}")
    return {"typed": bool(typed), "impl": str(jax.random.key_impl(rng)) if typed else None,
            "shape": list(data.shape), "key_data": data.ravel().tolist()}


def _rng_from_record(record: Mapping[str, Any] | None) -> jax.Array | None:
    if record is None:
        return None
    data = jnp.asarray(np.asarray(record["key_data"], np.uint32).reshape(record["shape"]))
    return jax.random.wrap_key_data(data, impl=record["impl"]) if record["typed"] else data


def _data_filename() -> str:
    # One file per process, named with the layout, so a restore under another layout fails by name.
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class Checkpointer:
    """Saves and restores training checkpoints in `cfg.directory` (module docstring: layout, atomicity).

    Every method is called by every process. Use as a context manager, or call `close()`, so that a
    pending async save is finished before the process exits."""

    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # A fixed cadence, plus the JAX preemption service's agreed step on multi-host jobs. orbax's
            # default would also save at the first step of a run without checkpoints; the loop decides that.
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(cfg.save_every), policies.PreemptionCheckpointingPolicy()]),
            preservation_policy=policies.LatestN(cfg.keep),
            enable_async_checkpointing=cfg.async_save,
            # A save killed mid-way leaves a temporary directory; it is never read, and is deleted here.
            cleanup_tmp_directories=True,
            create=True,
        )
        json_item = ocp.handlers.JsonCheckpointHandler
        handlers = {
            "model": ocp.handlers.StandardCheckpointHandler(),
            "optimizer": ocp.handlers.StandardCheckpointHandler(),
            # Every process writes its own data state (primary_host=None: no process is special).
            "data": json_item(_data_filename(),
                              multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None)),
            "rng": json_item("rng.json"),
            "meta": json_item("meta.json"),
        }
        directory = os.fspath(cfg.directory)
        if "://" not in directory:  # orbax refuses relative paths (train.py's demo writes runs/demo)
            directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS, item_handlers=handlers)

    @property
    def directory(self) -> str:
        return os.fspath(self._manager.directory)

    def should_save(self, step: int) -> bool:
        """True at the configured cadence (step % save_every == 0) or at a multi-host preemption step, and
        never for a step at or before the latest saved one."""
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True when the JAX preemption service (multi-host jobs) has chosen `step` to save and stop at;
        always False in a single-process run or when the service is off."""
        return self._manager.reached_preemption(step)

    def all_steps(self) -> list[int]:
        """Saved steps, oldest first (including a save this process has started and not yet finished)."""
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None. At startup this is the newest finalized checkpoint on disk."""
        return self._manager.latest_step()

    def save(self, step: int, *, model_state: Any, opt_state: Any, data_state: Mapping[str, Any] | None,
             rng: jax.Array | None, meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Saves a checkpoint of `step` when `should_save(step)` or `force`; returns whether it did.

        model_state: `nnx.state(model, sharding.MODEL_VARIABLES)`. opt_state: `nnx.state(optimizer)` or any
        pytree of arrays; None saves none (an export). data_state: this process's data iterator state (JSON
        or None). rng: a PRNG key, typed or raw, or None. meta: a small JSON dict (the run's config,
        metrics, ...). A step that is already saved is skipped (returns False), so a forced preemption save
        right after a regular save of the same step is harmless."""
        if step in self._manager.all_steps():
            return False
        # Checked before the arguments are converted: reading the key's data waits for the device.
        if not force and not self.should_save(step):
            return False
        items = {
            "model": ocp.args.StandardSave(_arrays(model_state, "model_state")),
            "data": ocp.args.JsonSave(_jsonable(data_state, "data_state")),
            "rng": ocp.args.JsonSave(_rng_record(rng)),
            "meta": ocp.args.JsonSave({"format": FORMAT_VERSION, "step": int(step),
                                       "meta": _jsonable(dict(meta or {}), "meta")}),
        }
        if opt_state is not None:
            items["optimizer"] = ocp.args.StandardSave(_arrays(opt_state, "opt_state"))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int | None = None, *, model_state: Any, opt_state: Any = None) -> Restored:
        """Restores `step` (default: the latest) into the structure of the given targets.

        The targets are abstract: `nnx.state(nnx.eval_shape(...))` passed through `with_shardings`, so each
        array is read straight into its NamedSharding on the mesh and never gathered on one device
        (concrete arrays work too; their shardings are used). opt_state=None skips the optimizer (e.g. to
        fine-tune with a fresh one). Raises CheckpointError when there is no such step or the checkpoint
        does not fit the targets."""
        self.wait()  # a step still being written by this process cannot be read yet
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"checkpoint directory {self.directory}: no finished checkpoint to restore")
        if step not in self._manager.all_steps():
            raise CheckpointError(f"checkpoint directory {self.directory}: no checkpoint of step {step} "
                                  f"(have {self.all_steps()})")
        items = {"model": ocp.args.StandardRestore(_values(model_state)), "data": ocp.args.JsonRestore(),
                 "rng": ocp.args.JsonRestore(), "meta": ocp.args.JsonRestore()}
        if opt_state is not None:
            items["optimizer"] = ocp.args.StandardRestore(_values(opt_state))
        where = f"checkpoint {self.directory}/{step}"
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{where}: does not fit the restore targets or is damaged: {e}") from e
        record = restored["meta"]
        if not isinstance(record, Mapping) or record.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{where}: meta.json is not a format {FORMAT_VERSION} record")
        if record.get("step") != step:
            raise CheckpointError(f"{where}: meta.json says step {record.get('step')}")
        return Restored(
            step=step,
            model_state=_rewrap(model_state, restored["model"]),
            opt_state=None if opt_state is None else _rewrap(opt_state, restored["optimizer"]),
            data_state=restored["data"],
            rng=_rng_from_record(restored["rng"]),
            meta=dict(record["meta"]),
        )

    def wait(self) -> None:
        """Blocks until every save started by this process is written and finalized (or raises its error)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
    """Within the block, SIGTERM and SIGINT set `requested` instead of ending the process, so the loop can
    save at a step boundary and exit; the previous handlers are back in place after the block.

    A second SIGINT raises KeyboardInterrupt as usual (an impatient Ctrl-C still stops a stuck run).
    `install=None` installs the handlers only in a single-process run: with several processes a flag
    raised on one host alone would make it leave while the others wait in a collective, and a Python
    handler would replace the SIGTERM handler of the JAX preemption service, which tells all hosts. There
    `stop(step)` relies on that service instead. Enter it in the main thread, after any
    `jax.distributed.initialize` (deciding `install=None` starts JAX's backend)."""

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS, *, install: bool | None = None):
        self.signals = tuple(signals)
        self.install = install   # None: decided on entry (after jax.distributed.initialize, which must come first)
        self.requested = False
        self.received: int | None = None  # the first signal that arrived
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.received is None:
            self.received = signum

    def stop(self, step: int) -> bool:
        """Whether the loop should save `step` (force=True), wait and exit: a signal arrived here, or (multi-
        host) the JAX preemption service has chosen this step. Call it once per step on every process."""
        # Evaluated on every call: the multi-host sync point must be polled at each step by all hosts.
        preempted = ocp.multihost.reached_preemption(step)
        return self.requested or preempted

    def __enter__(self) -> PreemptionGuard:
        install = jax.process_count() == 1 if self.install is None else self.install
        if install:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("PreemptionGuard: signal handlers can only be installed from the main thread")
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

