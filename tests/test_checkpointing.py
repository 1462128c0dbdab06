"""Training checkpoints: a bit-exact round trip of model, optimizer, data, RNG and metadata; restore into
NamedShardings on the 8-device mesh; keep-last-K; async saves; the save cadence; unfinished saves are never
restored; SIGTERM under PreemptionGuard; config and restore errors."""

import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import glmjax
from glmjax.errors import CheckpointError, ConfigError
from glmjax.model.moe import RouterBias
from glmjax.sharding import MODEL_VARIABLES, make_mesh, param_shardings
from glmjax.train.checkpointing import CheckpointConfig, Checkpointer, PreemptionGuard, with_shardings
from glmjax.train.optimizer import optimizer_shardings, path_names
from tests.conftest import REPO

TX = optax.adamw(1e-3)
DATA = {"version": 1, "fingerprint": "abc", "grain": {"next_index": 17, "remainder": [[1, 2], [3, 4]]}}
META = {"config": {"model": "tiny-demo", "peak_lr": 1e-3}, "metrics": {"loss": 2.5}}


def random_like(tree, seed):
    """Every array leaf of `tree` replaced by random numpy values of its shape and dtype."""
    rng = np.random.default_rng(seed)

    def fill(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return rng.integers(0, 1000, x.shape).astype(x.dtype)
        return rng.standard_normal(x.shape).astype(x.dtype)

    return jax.tree.map(fill, tree)


def flat(state):
    """{path: Variable} of a State."""
    return {"/".join(path_names(p)): v for p, v in
            jax.tree.leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))}


def assert_same(restored, saved):
    """Same paths, Variable types, dtypes and bits."""
    a, b = flat(restored), flat(saved)
    assert a.keys() == b.keys()
    for k in a:
        assert type(a[k]) is type(b[k]), k
        x, y = np.asarray(a[k].get_value()), np.asarray(b[k].get_value())
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x, y, err_msg=k)


@pytest.fixture(scope="module")
def tiny():
    """The abstract tiny model and optimizer, and concrete random states for both (built abstractly and
    filled with numpy: eager init costs ~20 s on 2 busy cores)."""
    cfg = glmjax.load_config(REPO / "configs" / "tiny-demo.json")
    abstract_model = nnx.eval_shape(lambda: glmjax.GlmMoeDsa(cfg, glmjax.ModelOptions(), rngs=nnx.Rngs(0)))
    abstract_opt = nnx.eval_shape(lambda: nnx.Optimizer(abstract_model, TX, wrt=nnx.Param))
    model_state = random_like(nnx.state(abstract_model, MODEL_VARIABLES), 0)
    opt_state = random_like(nnx.state(abstract_opt), 1)   # nonzero moments and count: a real test of bits
    return abstract_model, abstract_opt, model_state, opt_state


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """One synchronous checkpoint of the tiny model's states at step 7, shared by the restore tests."""
    _, _, model_state, opt_state = tiny
    cfg = CheckpointConfig(tmp_path_factory.mktemp("ckpt") / "run", save_every=7, keep=2, async_save=False)
    with Checkpointer(cfg) as ckpt:
        assert ckpt.save(7, model_state=model_state, opt_state=opt_state, data_state=DATA,
                         rng=jax.random.key(42), meta=META)
    return cfg


def test_state_holds_router_bias_and_adamw_moments(tiny):
    _, _, model_state, opt_state = tiny
    assert any(isinstance(v, RouterBias) for v in flat(model_state).values())
    assert any(k.startswith("opt_state/0/mu/") for k in flat(opt_state))


def test_round_trip_is_bit_exact(tiny, saved):
    abstract_model, abstract_opt, model_state, opt_state = tiny
    with Checkpointer(saved) as ckpt:   # a fresh Checkpointer, as after a restart
        assert ckpt.latest_step() == 7
        r = ckpt.restore(model_state=nnx.state(abstract_model, MODEL_VARIABLES),
                         opt_state=nnx.state(abstract_opt))
    assert r.step == 7
    assert_same(r.model_state, model_state)
    assert_same(r.opt_state, opt_state)
    assert r.data_state == DATA and r.meta == META
    assert jax.dtypes.issubdtype(r.rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(r.rng), jax.random.key_data(jax.random.key(42)))
    # The restored state drives the model and optimizer it came from.
    model = nnx.merge(nnx.graphdef(abstract_model), r.model_state)
    optimizer = nnx.merge(nnx.graphdef(abstract_opt), r.opt_state)
    assert int(optimizer.step[...]) == int(opt_state["step"][...])
    assert_same(nnx.state(model, MODEL_VARIABLES), model_state)


def test_restore_onto_mesh_uses_target_shardings(tiny, saved):
    abstract_model, abstract_opt, model_state, opt_state = tiny
    mesh = make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    model_sh = param_shardings(abstract_model, mesh)
    opt_sh = optimizer_shardings(nnx.state(abstract_opt), mesh)
    with Checkpointer(saved) as ckpt:
        r = ckpt.restore(model_state=with_shardings(nnx.state(abstract_model, MODEL_VARIABLES), model_sh),
                         opt_state=with_shardings(nnx.state(abstract_opt), opt_sh))
    assert_same(r.model_state, model_state)
    assert_same(r.opt_state, opt_state)
    split = 0
    for restored, expected in ((r.model_state, model_sh), (r.opt_state, opt_sh)):
        leaves = flat(restored)
        for path, sharding in flat_shardings(expected).items():
            got = leaves[path].get_value().sharding
            assert got == sharding, path
            split += not sharding.is_fully_replicated
    assert split > 50   # most arrays really are split over the mesh


def flat_shardings(tree):
    return {"/".join(path_names(p)): s for p, s in jax.tree.leaves_with_path(tree)}


def test_restore_without_optimizer_and_errors(tiny, saved, tmp_path):
    abstract_model, _, model_state, _ = tiny
    target = nnx.state(abstract_model, MODEL_VARIABLES)
    with Checkpointer(saved) as ckpt:
        r = ckpt.restore(7, model_state=target)
        assert r.opt_state is None
        assert_same(r.model_state, model_state)
        with pytest.raises(CheckpointError, match=r"no checkpoint of step 3 \(have \[7\]\)"):
            ckpt.restore(3, model_state=target)
    with Checkpointer(CheckpointConfig(tmp_path / "empty")) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(CheckpointError, match="no finished checkpoint"):
            ckpt.restore(model_state=target)


# ------------------------------------------------------------------------- small states: policy and timing

SMALL = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}


def save_small(ckpt, step, force=False):
    state = jax.tree.map(lambda x: x + step, SMALL)
    return ckpt.save(step, model_state=state, opt_state={"count": np.int32(step)}, data_state={"pos": step},
                     rng=jax.random.PRNGKey(step), meta={"step_loss": np.float32(step / 2)}, force=force)


def restore_small(ckpt, step=None):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), SMALL)
    return ckpt.restore(step, model_state=abstract, opt_state={"count": jax.ShapeDtypeStruct((), np.int32)})


def step_dirs(directory):
    return sorted(os.listdir(directory))


def test_keep_last_k_deletes_older_steps(tmp_path):
    with Checkpointer(CheckpointConfig(tmp_path, save_every=1, keep=2, async_save=False)) as ckpt:
        for step in range(1, 6):
            assert save_small(ckpt, step)
        assert ckpt.all_steps() == [4, 5]
    assert [d for d in step_dirs(tmp_path) if d.isdigit()] == ["4", "5"]


def test_should_save_cadence_and_forced_saves(tmp_path):
    with Checkpointer(CheckpointConfig(tmp_path, save_every=3, keep=None, async_save=False)) as ckpt:
        assert [ckpt.should_save(s) for s in range(1, 8)] == [False, False, True, False, False, True, False]
        assert [save_small(ckpt, s) for s in range(1, 8)] == [False, False, True, False, False, True, False]
        assert not ckpt.should_save(6)        # already saved
        assert save_small(ckpt, 7, force=True)  # a preemption save off the cadence
        assert not save_small(ckpt, 7, force=True)  # the same step again: skipped, no error
        assert ckpt.all_steps() == [3, 6, 7]
        r = restore_small(ckpt)
    assert r.step == 7 and r.data_state == {"pos": 7} and r.meta == {"step_loss": 3.5}
    np.testing.assert_array_equal(r.model_state["w"], SMALL["w"] + 7)
    assert r.opt_state["count"] == 7 and r.rng.dtype == jnp.uint32   # a raw key comes back raw
    np.testing.assert_array_equal(r.rng, jax.random.PRNGKey(7))


def test_async_save_then_wait(tmp_path):
    with Checkpointer(CheckpointConfig(tmp_path, save_every=1, async_save=True)) as ckpt:
        assert save_small(ckpt, 1)
        assert save_small(ckpt, 2)   # waits for step 1 itself
        ckpt.wait()
        assert "2" in step_dirs(tmp_path)
        assert not [d for d in step_dirs(tmp_path) if "tmp" in d]
    with Checkpointer(CheckpointConfig(tmp_path)) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        assert restore_small(ckpt).meta == {"step_loss": 1.0}


def test_unfinished_save_is_never_restored(tmp_path):
    """orbax writes step N as `N.orbax-checkpoint-tmp` and renames it to `N` only when every item is
    written: a save killed before that leaves the temporary directory, which is not a step (even with
    complete-looking contents) and is deleted once a new Checkpointer saves."""
    with Checkpointer(CheckpointConfig(tmp_path, save_every=1, async_save=False)) as ckpt:
        assert save_small(ckpt, 2)
    partial = tmp_path / "5.orbax-checkpoint-tmp"   # what a save of step 5 killed before its rename leaves
    shutil.copytree(tmp_path / "2", partial)
    # orbax alone (read-only: no cleanup) already ignores it.
    assert ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(read_only=True)).all_steps() == [2]
    with Checkpointer(CheckpointConfig(tmp_path, save_every=1, async_save=False)) as ckpt:
        assert ckpt.latest_step() == 2
        assert restore_small(ckpt).step == 2
        assert save_small(ckpt, 3)   # a save waits for the cleanup of leftovers
        assert not partial.exists()
        assert ckpt.all_steps() == [2, 3]


def test_relative_directory(tmp_path, monkeypatch):
    """A relative checkpoint directory (train.py's demo writes runs/demo) is taken from the working directory:
    orbax itself refuses relative paths."""
    monkeypatch.chdir(tmp_path)
    with Checkpointer(CheckpointConfig("runs/demo/checkpoints", save_every=1, async_save=True)) as ckpt:
        assert save_small(ckpt, 1)
        ckpt.wait()
        assert ckpt.directory == str(tmp_path / "runs/demo/checkpoints")
    with Checkpointer(CheckpointConfig("runs/demo/checkpoints")) as ckpt:
        assert restore_small(ckpt).step == 1


def test_optional_optimizer_and_empty_state(tmp_path):
    with Checkpointer(CheckpointConfig(tmp_path, save_every=1, async_save=False)) as ckpt:
        with pytest.raises(ValueError, match="model_state holds no arrays"):
            ckpt.save(1, model_state={}, opt_state=None, data_state=None, rng=None)
        assert ckpt.save(1, model_state=SMALL, opt_state=None, data_state=None, rng=None)
        with pytest.raises(CheckpointError, match="checkpoint .*/1: does not fit"):
            restore_small(ckpt)   # asks for an optimizer state that was not saved
        r = ckpt.restore(model_state=jax.tree.map(np.zeros_like, SMALL))   # concrete targets work too
    assert r.opt_state is None and r.rng is None and r.data_state is None and r.meta == {}
    np.testing.assert_array_equal(r.model_state["w"], SMALL["w"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_guard_turns_signal_into_flag(sig):
    before = signal.getsignal(sig)
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.stop(1)
        os.kill(os.getpid(), sig)
        deadline = time.monotonic() + 5
        while not guard.requested and time.monotonic() < deadline:   # delivered at a bytecode boundary
            time.sleep(0.01)
        assert guard.requested and guard.received == sig and guard.stop(2)
    assert signal.getsignal(sig) is before   # the previous handler is back


def test_second_ctrl_c_still_interrupts():
    with pytest.raises(KeyboardInterrupt), PreemptionGuard() as guard:
        guard._handle(signal.SIGINT, None)   # the first one only asks to stop
        assert guard.requested
        guard._handle(signal.SIGINT, None)


def test_preemption_guard_can_leave_handlers_alone():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard(install=False) as guard:
        assert signal.getsignal(signal.SIGTERM) is before and not guard.stop(0)


@pytest.mark.parametrize("kwargs, field", [
    (dict(directory=""), "directory"), (dict(save_every=0), "save_every"), (dict(save_every=2.5), "save_every"),
    (dict(keep=0), "keep"), (dict(keep=True), "keep"), (dict(async_save="yes"), "async_save"),
])
def test_bad_config_field_is_named(kwargs, field, tmp_path):
    with pytest.raises(ConfigError, match=rf"CheckpointConfig\.{field}:"):
        CheckpointConfig(**{"directory": tmp_path, **kwargs})


def test_config_from_dict():
    assert CheckpointConfig.from_dict({"directory": "/ckpt", "keep": None}).keep is None
    with pytest.raises(ConfigError, match=r"CheckpointConfig\.save_evry: unknown field"):
        CheckpointConfig.from_dict({"directory": "/ckpt", "save_evry": 10})
    with pytest.raises(ConfigError, match=r"CheckpointConfig\.directory: required"):
        CheckpointConfig.from_dict({})
