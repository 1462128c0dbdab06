"""The training loop behind train.py: model, optimizer and data on a mesh, the jitted step, validation,
checkpoints, metrics, and the Hugging Face export.

One optimizer step (`train_step`, one jitted program):
  micro-batches of the global batch -> objective (glmjax.train.objective) -> float32 gradients of the
  stage's trainable parameters (glmjax.train.optimizer.accumulate_gradients) -> optax update of the float32
  master weights -> router bias update from the step's expert loads (glmjax.train.balance) -> metrics.
The host only feeds batches, logs, saves and evaluates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

import glmjax
from glmjax.config import GlmMoeDsaConfig
from glmjax.errors import ConfigError
from glmjax.model.options import ModelOptions
from glmjax.sharding import MODEL_VARIABLES, logical_to_spec, make_mesh, param_shardings, shard_model
from glmjax.train import balance
from glmjax.train import metrics as metrics_lib
from glmjax.train.checkpointing import Checkpointer, PreemptionGuard
from glmjax.train.config import DEMO_FILES, PRESETS, TrainConfig
from glmjax.train.data import batch_iterator
from glmjax.train.objective import Terms, objective
from glmjax.train.optimizer import accumulate_gradients, create_optimizer, step_metrics

REPO = PRESETS.parents[1]


def model_options(cfg: TrainConfig) -> ModelOptions:
    m = cfg.model
    return ModelOptions(dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
                        attention_impl=m.attention_impl, q_block=m.q_block, remat=m.remat,
                        indexer_loss=cfg.run.stage in ("sparse", "dense_warmup"),
                        dense_attention=cfg.run.stage == "dense_warmup",
                        moe_gmm_impl=m.moe_gmm_impl or None, moe_capacity_factor=m.moe_capacity_factor)


def resolve_demo(cfg: TrainConfig, log=print) -> tuple[TrainConfig, int | None]:
    """For a demo preset: trains (or reuses) the stdlib tokenizer in run.output_dir and fills in the data
    files, tokenizer and EOS. -> (config, the tokenizer's vocab size or None)."""
    if cfg.demo is None:
        return cfg, None
    from glmjax.train.tokenizer import build_demo_tokenizer

    if cfg.data.train_files != DEMO_FILES:
        raise ConfigError("data.train_files: a [demo] preset takes its files from the Python standard library; "
                          "remove [demo] to train on your own files")
    out = Path(cfg.run.output_dir)
    try:
        demo = build_demo_tokenizer(out, cfg.demo.tokenizer_vocab, validation_fraction=cfg.demo.validation_fraction)
    except ValueError as e:
        raise ConfigError(f"run.output_dir: {e}") from None
    made = f"trained in {demo.seconds:.1f} s" if demo.seconds else "reused"
    log(f"demo: tokenizer of {cfg.demo.tokenizer_vocab} tokens on {len(demo.train_files)} stdlib files "
        f"({len(demo.validation_files)} held out), {made} -> {demo.path}")
    data = dataclasses.replace(cfg.data, train_files=tuple(map(str, demo.train_files)),
                               validation_files=tuple(map(str, demo.validation_files)), validation_fraction=0.0,
                               tokenizer=str(demo.path), eos_id=demo.eos_id)
    return dataclasses.replace(cfg, data=data), cfg.demo.tokenizer_vocab


def model_config(cfg: TrainConfig, vocab: int | None) -> GlmMoeDsaConfig:
    if cfg.model.checkpoint:
        return glmjax.load_config(Path(cfg.model.checkpoint) / "config.json")
    if not cfg.model.config:
        raise ConfigError("model.config / model.checkpoint: one is required")
    path = Path(cfg.model.config)
    if not path.exists() and not path.is_absolute() and (REPO / path).exists():
        path = REPO / path  # the presets name the repository's configs; train.py may run elsewhere
    mc = glmjax.load_config(path)
    return mc if vocab is None else mc.replace(vocab_size=vocab)


def build_model(cfg: TrainConfig, mc: GlmMoeDsaConfig, mesh) -> glmjax.GlmMoeDsa:
    """The model on `mesh`: loaded from the HF checkpoint, or initialised by a jitted init whose outputs are
    already sharded (no parameter is ever whole on one device)."""
    opts = model_options(cfg)
    if cfg.model.checkpoint:
        model = glmjax.load_pretrained(cfg.model.checkpoint, options=opts)
        return shard_model(model, mesh)
    abstract = nnx.eval_shape(lambda: glmjax.GlmMoeDsa(mc, opts, rngs=nnx.Rngs(cfg.run.seed)))
    graphdef, _ = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.state(glmjax.GlmMoeDsa(mc, opts, rngs=nnx.Rngs(cfg.run.seed)), MODEL_VARIABLES)

    rest = nnx.state(abstract, nnx.RngState)
    return nnx.merge(graphdef, init(), rest)


def put_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Host-local rows [B_local, T] -> global arrays split over the batch and sequence mesh axes."""
    out = {}
    for k, v in batch.items():
        n = v.shape[0] * jax.process_count()
        spec = logical_to_spec(("batch", None), (n, v.shape[1]), mesh=mesh, what=f"batch {k}")
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), v)
    return out


def _scalars(terms: Terms, prefix: str) -> dict[str, jax.Array]:
    out = {f"{prefix}/loss": terms.loss, f"{prefix}/lm_loss": terms.lm, f"{prefix}/indexer_kl": terms.indexer_kl,
           f"{prefix}/balance_loss": terms.balance, f"{prefix}/perplexity": jnp.exp(terms.lm)}
    if terms.mtp_accepted is not None:
        out[f"{prefix}/mtp_expected_accepted"] = terms.mtp_accepted
    for s in range(terms.mtp.shape[-1]):
        out[f"{prefix}/mtp_loss/{s + 1}"] = terms.mtp[..., s]
        out[f"{prefix}/mtp_accuracy/{s + 1}"] = terms.mtp_accuracy[..., s]
    return out


def make_train_step(cfg: TrainConfig):
    return _train_step(cfg.loss, cfg.run.stage, cfg.optimizer)


def bind_train_step(cfg: TrainConfig, model, optimizer):
    """make_train_step(cfg) with model and optimizer bound: batch -> (metrics, MoE load). nnx.cached_partial
    keeps their graph traversal from one call to the next instead of redoing it every step (10 ms of Python per
    step on the CPU benchmark's 8.7M-parameter model); they are still updated in place."""
    return nnx.cached_partial(make_train_step(cfg), model, optimizer)


@functools.cache  # one jitted function per objective: a resumed run in the same process reuses its compile
def _train_step(loss_cfg, stage: str, opt_cfg):
    return nnx.jit(train_step_fn(loss_cfg, stage, opt_cfg))


def train_step_fn(loss_cfg, stage: str, opt_cfg):
    """The train step, not yet jitted: (model, optimizer, batch) -> (metrics, MoE load [Lm, E] or None);
    updates model and optimizer in place."""
    accum = opt_cfg.grad_accum_steps

    def loss_fn(model, micro):
        terms = objective(model, micro["input_ids"], micro["segment_ids"], loss_cfg, stage)
        # Token-weighted across micro-batches (accumulate_gradients divides by the summed weights).
        return terms.loss * terms.lm_tokens, (terms.lm_tokens, terms)

    def train_step(model, optimizer, batch):
        acc = accumulate_gradients(loss_fn, model, batch, steps=accum, wrt=optimizer.wrt)
        optimizer.update(model, acc.grads)
        terms: Terms = acc.aux
        moe_load = None if terms.moe_load is None else jnp.sum(terms.moe_load, axis=0)
        mtp_load = None if terms.mtp_moe_load is None else jnp.sum(terms.mtp_moe_load, axis=0)
        if stage != "dense_warmup":  # the warm-up changes the indexers and nothing else
            balance.update_router_bias(model, moe_load, mtp_load, loss_cfg.bias_update_rate)
        weights = terms.lm_tokens / jnp.maximum(jnp.sum(terms.lm_tokens), 1.0)
        mean = jax.tree.map(lambda a: jnp.tensordot(weights, a.astype(jnp.float32), axes=1), terms._replace(
            moe_load=None, mtp_moe_load=None, lm_tokens=terms.lm_tokens))
        out = _scalars(mean, "train")
        out["train/tokens"] = jnp.sum(terms.lm_tokens)
        out.update({f"train/{k}": v for k, v in step_metrics(optimizer, opt_cfg).items()})
        return out, moe_load

    return train_step


def make_eval_step(cfg: TrainConfig):
    return _eval_step(cfg.loss, cfg.run.stage)


@functools.cache
def _eval_step(loss_cfg, stage: str):
    @nnx.jit
    def eval_step(model, batch):
        terms = objective(model, batch["input_ids"], batch["segment_ids"], loss_cfg, stage)
        return _scalars(terms, "val"), terms.lm_tokens

    return eval_step


class Trainer:
    """Owns one run: `Trainer(cfg).fit()`."""

    def __init__(self, cfg: TrainConfig, *, log=print):
        self.log = log
        cfg, vocab = resolve_demo(cfg, log)
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        n = math.prod(cfg.mesh.values()) if cfg.mesh else 1
        devices = jax.devices()
        if n > len(devices):
            raise ConfigError(f"mesh: {dict(cfg.mesh)} needs {n} devices, this run has {len(devices)}")
        self.mesh = make_mesh(cfg.mesh, devices[:n])
        self.model_config = model_config(cfg, vocab)
        with jax.set_mesh(self.mesh):
            self.model = build_model(cfg, self.model_config, self.mesh)
            self.optimizer = create_optimizer(self.model, cfg.optimizer, cfg.run.stage, mesh=self.mesh)
        self.train_data = batch_iterator(cfg.data, "train")
        self.checkpointer = Checkpointer(cfg.checkpoint)
        self.step = 0
        self.eval_step = make_eval_step(cfg)
        self._restore()

    # ------------------------------------------------------------------------------------------ checkpoints

    def _states(self):
        return nnx.state(self.model, MODEL_VARIABLES), nnx.state(self.optimizer)

    def _restore(self) -> None:
        if self.checkpointer.latest_step() is None:
            return
        model_state, opt_state = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self._states())
        r = self.checkpointer.restore(model_state=model_state, opt_state=opt_state)
        nnx.update(self.model, r.model_state)
        nnx.update(self.optimizer, r.opt_state)
        self.train_data.set_state(r.data_state)
        self.step = r.step
        self.log(f"resumed from step {r.step} ({self.checkpointer.directory})")

    def save(self, *, force: bool = False) -> bool:
        model_state, opt_state = self._states()
        return self.checkpointer.save(self.step, model_state=model_state, opt_state=opt_state,
                                      data_state=self.train_data.get_state(), rng=jax.random.key(self.cfg.run.seed),
                                      meta={"config": self.cfg.to_dict()}, force=force)

    # ------------------------------------------------------------------------------------------------ loop

    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        if not cfg.run.eval_batches or not cfg.data.has_validation():
            return {}
        sums: dict[str, float] = {}
        total = 0.0
        counts = np.zeros(self.model_config.vocab_size, np.int64)
        with batch_iterator(cfg.data, "validation", num_epochs=None) as it, jax.set_mesh(self.mesh):
            for _ in range(cfg.run.eval_batches):
                host = next(it)
                counts += np.bincount(host["input_ids"][host["segment_ids"] != 0], minlength=counts.size)
                scalars, tokens = self.eval_step(self.model, put_batch(host, self.mesh))
                w = float(tokens)
                total += w
                for k, v in scalars.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * w
        out = {k: v / max(total, 1.0) for k, v in sums.items()}
        # The validation tokens' own unigram entropy: the loss of a model that knows their frequencies exactly
        # but no context (a lower bound on any context-free model's loss).
        p = counts[counts > 0] / max(counts.sum(), 1)
        out["val/unigram_entropy"] = float(-(p * np.log(p)).sum())
        return out

    def fit(self) -> dict[str, float]:
        """Runs to run.steps (from wherever the checkpoint left off); returns the last logged metrics."""
        cfg = self.cfg
        writer = metrics_lib.MetricsWriter(self.out)
        progress = metrics_lib.Progress(cfg.run.steps, start_step=self.step)
        last: dict[str, float] = {}
        window: list[dict[str, float]] = []
        self.log(f"model: {self.model_config.num_parameters() / 1e6:.2f}M parameters, "
                 f"{self.model_config.num_hidden_layers} layers; mesh {dict(self.mesh.shape)}; "
                 f"stage {cfg.run.stage}; steps {self.step} -> {cfg.run.steps}")
        try:
            with PreemptionGuard() as guard, jax.set_mesh(self.mesh):
                train_step = bind_train_step(cfg, self.model, self.optimizer)
                while self.step < cfg.run.steps:
                    t0 = time.perf_counter()
                    batch = put_batch(next(self.train_data), self.mesh)
                    scalars, moe_load = train_step(batch)
                    self.step += 1
                    scalars = {k: float(v) for k, v in scalars.items()}
                    if moe_load is not None:
                        scalars.update(metrics_lib.moe_imbalance(np.asarray(moe_load)))
                    scalars["train/step_seconds"] = time.perf_counter() - t0
                    progress.update(self.step, loss=scalars["train/loss"], tokens=int(scalars["train/tokens"]))
                    metrics_lib.check_finite(scalars, self.step)
                    window.append(scalars)
                    if self.step % cfg.run.log_every == 0 or self.step == cfg.run.steps:
                        # Means over the steps since the last log (tokens summed): one batch is a noisy sample.
                        last = {k: (sum if k == "train/tokens" else np.mean)([w[k] for w in window if k in w])
                                for k in window[-1]}
                        writer.log(self.step, last)
                        window = []
                    if cfg.run.eval_every and (self.step % cfg.run.eval_every == 0 or self.step == cfg.run.steps):
                        val = self.evaluate()
                        if val:
                            writer.log(self.step, val)
                            last.update(val)
                    if guard.stop(self.step):
                        self.log(f"preemption requested: saving step {self.step} and exiting")
                        self.save(force=True)
                        break
                    if self.checkpointer.should_save(self.step) or self.step == cfg.run.steps:
                        writer.flush()
                        self.save(force=self.step == cfg.run.steps)
        finally:
            progress.close()
            self.checkpointer.wait()
            writer.close()
        if (self.out / "metrics.jsonl").exists():
            metrics_lib.plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        if cfg.run.export_hf and self.step >= cfg.run.steps:
            self.export(self.out / "hf")
        return last

    def export(self, path: Path) -> Path:
        """The trained model as a Hugging Face checkpoint (with the tokenizer, when there is one)."""
        dt = jnp.dtype(self.cfg.run.export_dtype)
        graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        cast = jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
        glmjax.save_pretrained(nnx.merge(graphdef, cast, rest), path)
        if self.cfg.data.tokenizer:
            shutil.copy(self.cfg.data.tokenizer, Path(path) / "tokenizer.json")
        (Path(path) / "training.json").write_text(json.dumps({"step": self.step, "config": self.cfg.to_dict()},
                                                            indent=1))
        self.log(f"exported the model to {path}")
        return Path(path)

    def close(self) -> None:
        self.train_data.close()
        self.checkpointer.close()

