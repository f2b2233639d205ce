"""The training loop: one jitted, donated train step over pytrees; eval, logs,
checkpoints.

What is trained is the objective's business (:mod:`train.objectives`); this
module only runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Optional

import jax
import numpy as np
import optax
import tqdm
from flax import nnx

import galore_optax
from models import lora
from models.registry import MODELS
from train import layerwise
from train import parallel
from train import report
from train import trackers
from train.checkpoint import Checkpointer
from train.config import TrainConfig
from train.objectives import OBJECTIVES
from train.objectives import Objective
from train.objectives.base import base_model_config
from train.optimizers import OPTIMIZERS
from train.optimizers import galore_targets

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints")


def model_name(cfg) -> str:
  """What the run trains: the checkpoint it started from, or its preset."""
  return f"from {cfg.init}" if cfg.init else f"preset {cfg.preset!r}"


class ConfigError(ValueError):
  """The run cannot start as configured; the message says why."""


class TrainingDiverged(RuntimeError):
  """The loss became non-finite; the message gives the step and the last
  checkpoint."""


# ---------------------------------------------------------------------------
# building


def matrices(params: Any, stacked: bool = False) -> Any:
  """True for the leaves weight decay applies to: matrices (not biases or
  norms); ``stacked`` blocks' leading layer axis does not count."""

  def is_matrix(path, x):
    layer_axis = stacked and galore_optax.targets.path_str(path).startswith(
        layerwise.BLOCKS + "/"
    )
    return x.ndim - layer_axis >= 2

  return jax.tree_util.tree_map_with_path(is_matrix, params)


def effective_scale(cfg: TrainConfig, params: Any) -> Optional[str]:
  """What ``cfg.scale`` multiplies each targeted matrix shape by, e.g.
  ``'rms (128x512 r32: 2, 128x128 r32: 2)'``; None for optimizers without a
  subspace. ``params``: unstacked, as :func:`build_optimizer` takes them."""
  spec = OPTIMIZERS[cfg.optimizer]
  if not spec.per_matrix:
    return None if cfg.scale is None else f"{cfg.scale:g}"
  plans = galore_optax.plan_leaves(
      params, rank=cfg.rank, proj_type=cfg.proj_type, targets=galore_targets()
  )
  factors = galore_optax.step_size.describe(
      plans, cfg.scale, apollo=spec.family == "apollo"
  )
  return f"{cfg.scale} ({factors})"


def build_optimizer(
    cfg: TrainConfig, params: Any, axis_name: Any = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer named by ``cfg`` behind global-norm clipping (which the
  layer-wise step applies itself), accumulating ``cfg.grad_accum``
  micro-batches, and its learning-rate schedule.

  On stacked blocks (``cfg.stacked``) an element-wise optimizer runs on them
  as it is and any other block by block (:func:`train.layerwise.per_block`;
  the layer-wise step does so itself).
  ``params``: in the unstacked layout (see :func:`train.layerwise.unstacked`),
  to check ranks against.
  ``axis_name``: the pmap axis, over which GaLore spreads its refreshes.
  """
  if cfg.schedule == "cosine":
    # counted in optimizer updates: one per --grad-accum micro-batches
    updates, warmup = (
        cfg.steps // cfg.grad_accum,
        cfg.warmup_steps // cfg.grad_accum,
    )
    lr = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.lr,
        warmup,
        max(updates, warmup + 1),
        end_value=0.1 * cfg.lr,
    )
  else:
    lr = optax.constant_schedule(cfg.lr)
  spec = OPTIMIZERS[cfg.optimizer]
  # An element-wise optimizer runs on stacked blocks as it is; any other runs
  # block by block (layerwise.per_block), as the layer-wise step runs it.
  whole_stack = cfg.stacked and not cfg.layerwise and spec.elementwise
  kwargs = spec.keywords(cfg, axis_name)
  if cfg.weight_decay:
    kwargs.update(
        weight_decay=cfg.weight_decay,
        mask=functools.partial(matrices, stacked=whole_stack),
    )
  if spec.per_matrix:
    plans = galore_optax.plan_leaves(
        params, rank=cfg.rank, proj_type=cfg.proj_type, targets=galore_targets()
    )
    for plan in filter(None, plans):
      if cfg.rank > min(plan.view.m, plan.view.n):
        raise ConfigError(
            f"--rank {cfg.rank} is larger than the matrix {plan.path!r}"
            f" ({plan.view.m} x {plan.view.n}); choose at most"
            f" {min(plan.view.m, plan.view.n)}"
        )
  tx = spec.factory(lr, **kwargs)
  if cfg.stacked and not cfg.layerwise and not whole_stack:
    tx = layerwise.per_block(tx)
  if cfg.clip and not cfg.layerwise:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip), tx)
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, cfg.grad_accum).gradient_transformation()
  if cfg.lora_rank:
    tx = optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        functools.partial(
            lora_labels,
            heads=MODELS[cfg.model].heads,
            rest=cfg.lora_train_rest,
        ),
    )
  return tx, lr


def lora_labels(params: Any, heads: tuple[str, ...], rest: bool = False) -> Any:
  """'train' for what trains under LoRA (:func:`models.lora.trainable`),
  'frozen' elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: (
          "train"
          if lora.trainable(galore_optax.targets.path_str(path), heads, rest)
          else "frozen"
      ),
      params,
  )


def lora_trainable(
    params: Any, heads: tuple[str, ...], rest: bool = False
) -> int:
  """How many parameters train under LoRA (:func:`lora_labels`)."""
  return sum(
      x.size
      for x, label in zip(
          jax.tree.leaves(params),
          jax.tree.leaves(lora_labels(params, heads, rest)),
      )
      if label == "train"
  )


def make_steps(graphdef, tx, loss_fn: Callable, gather: Callable = lambda p: p):
  """``train_step(params, opt_state, batch, grad_reduce=None)`` and
  ``eval_step(params, batch)``.

  ``train_step`` returns the new params and state and ``{"loss",
  "bases_computed"}``: the running count of GaLore bases tells the loop which
  steps refreshed. ``gather`` turns stored parameters into the ones the forward
  pass uses (whole, under FSDP); ``grad_reduce`` averages gradients and loss
  over a pmap axis. The caller jits or pmaps.
  """

  def train_step(params, opt_state, batch, grad_reduce=None):
    grad_fn = jax.value_and_grad(
        lambda p: loss_fn(nnx.merge(graphdef, gather(p)), batch), has_aux=True
    )
    (loss, _), grads = grad_fn(params)
    if grad_reduce is not None:
      grads, loss = grad_reduce((grads, loss))
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = {
        "loss": loss,
        "bases_computed": galore_optax.bases_computed(opt_state),
    }
    return optax.apply_updates(params, updates), opt_state, metrics

  def eval_step(params, batch):
    return loss_fn(nnx.merge(graphdef, gather(params)), batch)

  return train_step, eval_step


def holds_run(out: pathlib.Path) -> bool:
  return any((out / name).exists() for name in RUN_FILES)


def first_free(
    base: pathlib.Path, taken: Callable[[pathlib.Path], bool]
) -> pathlib.Path:
  """The first of ``base``, ``base-1``, ``base-2``, ... that is not
  ``taken``."""
  candidates = (
      base.with_name(f"{base.name}-{i}") if i else base for i in range(10**6)
  )
  return next(c for c in candidates if not taken(c))


def run_directory(cfg: TrainConfig) -> pathlib.Path:
  """Where the run writes: ``--out``, or the first of ``runs/<model>``,
  ``runs/<model>-1``, ... that holds no run. An ``--out`` that holds one is
  refused unless resumed or overwritten.
  """
  if cfg.out is None:
    if jax.process_count() > 1:
      raise ConfigError(
          "a multi-process run needs --out: every process must write to the"
          " same directory"
      )
    return first_free(pathlib.Path("runs") / cfg.model, holds_run)
  out = pathlib.Path(cfg.out)
  if holds_run(out) and not (cfg.resume or cfg.overwrite):
    raise ConfigError(
        f"--out {out} already holds a run; pass --resume to continue it,"
        " --overwrite to replace it, or another --out"
    )
  return out


# ---------------------------------------------------------------------------
# running


class Progress:
  """One report per log step: loss, lr, throughput and ETA. On a terminal a
  tqdm bar redrawn in place; to a file or a pipe one line per report."""

  def __init__(self, total: int, unit: str, done: int = 0, stream=None):
    self.total, self.unit = total, unit
    self.stream = sys.stdout if stream is None else stream
    self.bar = None
    if self.stream.isatty():
      self.bar = tqdm.tqdm(
          total=total,
          initial=done,
          file=self.stream,
          ascii=".#",
          mininterval=0,  # a report per log step, not per tenth of a second
          bar_format="[{bar:20}] {n_fmt:>5}/{total_fmt}  {desc}",
      )

  def show(
      self, step: int, loss: float, lr: float, rate: float, eta_s: float
  ) -> None:
    report = (
        f"loss {loss:.4f}  lr {lr:.2e}  {rate / 1000:.1f}k {self.unit}/s  ETA"
        f" {int(eta_s) // 60}:{int(eta_s) % 60:02d}"
    )
    if self.bar is not None:
      self.bar.set_description_str(report, refresh=False)
      self.bar.update(step - self.bar.n)
      return
    filled = int(20 * step / self.total)
    print(
        f"[{'#' * filled}{'.' * (20 - filled)}] {step:>5}/{self.total} "
        f" {report}",
        file=self.stream,
        flush=True,
    )

  def note(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def evaluate(
    objective: Objective, cfg: TrainConfig, eval_step, params, data, placement
) -> dict:
  losses, aux = [], []
  for batch in objective.eval_batches(cfg, data):
    n = len(batch[0])
    if (
        n % placement.size
    ):  # a split smaller than one batch may not spread over the devices
      continue
    batch = placement.put_batch(
        tuple(x[placement.local_rows(n)] for x in batch), n
    )
    loss, batch_aux = eval_step(params, batch)
    losses.append(float(loss))
    aux.append(batch_aux)
  if not losses:
    raise ConfigError(
        "the validation split is smaller than one batch; lower --batch-size or"
        " --seq-len"
    )
  return objective.eval_metrics(losses, aux)


def _read_metrics(path: pathlib.Path, upto: int) -> list[dict]:
  """The rows logged up to step ``upto``; a torn last line (a crash mid-write)
  is dropped."""
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return [r for r in rows if r["step"] <= upto]


class RunResult(NamedTuple):
  summary: dict  # as written to DIR/summary.json
  params: Any
  opt_state: Any


# the model's config (unstacked, every size the data decided), beside
# config.json: what export and sample rebuild the model from
MODEL_FILE = "model.json"


class Run:
  """One training run, set up, stepped and summed up.

  ``Run(cfg)`` sets up what a dry run and a real run share: the devices, the
  data, the model and the optimizer. Then either :meth:`dry_run`, or
  :meth:`start` (state on the devices, the checkpoint resumed, the step
  compiled), :meth:`steps` and :meth:`finish`. :func:`train` does all of it.
  """

  def __init__(self, cfg: TrainConfig, verbose: bool = True):
    self.objective = objective = OBJECTIVES[cfg.objective]
    cfg = cfg.with_model_width(base_model_config(cfg).d_model)
    parallel.initialize_processes(
        cfg.coordinator, cfg.num_processes, cfg.process_id, cfg.distributed
    )
    self.placement = (
        parallel.PmapPlacement.create(cfg.mesh)
        if cfg.parallel == "pmap"
        else parallel.MeshPlacement.create(cfg.mesh, cfg.mesh_axes)
    )
    parallel.limit_blas_threads()
    self.out = run_directory(cfg)
    self.cfg = cfg = dataclasses.replace(cfg, out=str(self.out))
    # the process that writes logs, metrics and plots
    self.lead = jax.process_index() == 0
    self.verbose = verbose and self.lead
    self.data = data = objective.load_data(cfg)

    def build():
      model = objective.build_model(cfg, data)
      if cfg.lora_rank:
        lora.add_adapters(model, cfg.lora_rank, nnx.Rngs(cfg.seed + 1))
      return model

    # a dry run builds the model on abstract shapes: nothing is allocated
    model = nnx.eval_shape(build) if cfg.dry_run else build()
    # what export and sample rebuild the model from (model.json)
    self.model_config = model.config
    graphdef, state = nnx.split(model)
    self.params = params = nnx.to_pure_dict(state)
    self.n_params = sum(x.size for x in jax.tree.leaves(params))
    # what trains under --lora-rank
    self.n_trainable = (
        lora_trainable(params, MODELS[cfg.model].heads, cfg.lora_train_rest)
        if cfg.lora_rank
        else None
    )
    unstacked = layerwise.unstacked(params) if cfg.stacked else params
    self.tx, self.schedule = build_optimizer(
        cfg,
        unstacked,
        axis_name=parallel.PMAP_AXIS if cfg.parallel == "pmap" else None,
    )
    # the state's bytes leaf by leaf, as the unstacked layout would hold them
    unstacked_tx = (
        build_optimizer(
            dataclasses.replace(cfg, layerwise=False, remat="none"), unstacked
        )[0]
        if cfg.stacked
        else self.tx
    )
    self.memory = galore_optax.memory_report(unstacked, unstacked_tx)
    self.scale = effective_scale(cfg, unstacked)
    self.init = (
        functools.partial(layerwise.init, self.tx)
        if cfg.layerwise
        else self.tx.init
    )
    gather = self.placement.gather_for_compute
    self.step_fn, eval_fn = make_steps(
        graphdef, self.tx, objective.loss, gather
    )
    if cfg.layerwise:
      self.step_fn = layerwise.make_train_step(
          graphdef,
          nnx.graphdef(model.blocks),
          self.tx,
          objective.head_loss,
          clip=cfg.clip,
          gather=gather,
      )
      # it keeps the blocks' 16-bit leaves packed (see layerwise.Bits)
      self.pack, self.unpack = layerwise.pack_params, layerwise.unpack_params
      self.eval_fn = lambda params, batch: eval_fn(self.unpack(params), batch)
    else:
      self.pack = self.unpack = lambda params: params
      self.eval_fn = eval_fn

  def _batch(self, step: int) -> Any:
    cfg, placement = self.cfg, self.placement
    rows = placement.local_rows(cfg.batch_size)
    return placement.put_batch(
        self.objective.batch(cfg, self.data, step, rows), cfg.batch_size
    )

  def _write(self, name: str, text: str) -> None:
    if self.lead:
      report.write_atomic(self.out / name, text)

  def dry_run(self) -> RunResult:
    """Compiles the train step on abstract shapes, reports its per-device
    bytes (printed and in ``DIR/summary.json``) and returns without
    training."""
    cfg, memory = self.cfg, self.memory
    t0 = time.perf_counter()
    params, opt_state = self.placement.abstract(self.params, self.init)
    params = self.pack(params)
    _, step_memory = self.placement.compile_step(
        self.step_fn, params, opt_state, self._batch(0)
    )
    summary = {
        "model": cfg.model,
        "objective": cfg.objective,
        "preset": cfg.preset,
        "optimizer": cfg.optimizer,
        "dry_run": True,
        "batch_size": cfg.batch_size,
        **({"seq_len": cfg.seq_len} if self.objective.unit == "tok" else {}),
        "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "param_bytes": memory.param_bytes,
        "optimizer_state_bytes": memory.state_bytes,
        "adamw_state_bytes": memory.adamw_bytes,
        "compile_s": time.perf_counter() - t0,
        "per_device": _per_device(
            self.placement, params, opt_state, step_memory
        ),
    }
    if self.lead:
      self.out.mkdir(parents=True, exist_ok=True)
    self._write("config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    self._write("summary.json", json.dumps(summary, indent=2))
    if self.verbose:
      print(report.describe_dry_run(summary))
    return RunResult(summary, params, opt_state)

  def start(self) -> None:
    """Puts the params and the optimizer state on the devices, resumes the
    checkpoint under ``--resume``, opens the logs and compiles the steps."""
    cfg, placement, out = self.cfg, self.placement, self.out
    # first: a tracker whose package is missing stops the run before it
    # writes anything
    self.trackers = (
        trackers.open_trackers(trackers.parse(cfg.log_to), out, cfg)
        if self.lead
        else []
    )
    params = placement.put_params(self.params)
    opt_state = placement.init_state(self.init, params)
    params = self.pack(params)
    # orbax refuses zero-size arrays, which optax.contrib.galore's state
    # holds: such runs keep no checkpoints.
    savable = all(x.size for x in jax.tree.leaves(opt_state))
    if not savable and cfg.resume:
      raise ConfigError(
          f"--resume: {cfg.optimizer}'s state holds zero-size arrays, which"
          " orbax cannot save, so its runs keep no checkpoints"
      )
    if self.lead:
      out.mkdir(parents=True, exist_ok=True)
    if not savable and self.verbose:
      print(
          f"note: no checkpoints: {cfg.optimizer}'s state holds zero-size"
          " arrays, which orbax cannot save"
      )
    self.checkpointer = Checkpointer(
        out,
        cfg.checkpoint_every,
        cfg.keep_checkpoints,
        fresh=cfg.overwrite,
        enabled=savable,
    )
    self.start_step = 0  # where this invocation began
    if cfg.resume:
      params, opt_state, meta = self.checkpointer.restore(
          placement.to_checkpoint(params),
          placement.to_checkpoint(opt_state),
          cfg.identity(),
      )
      params = placement.from_checkpoint(params)
      opt_state = placement.from_checkpoint(opt_state)
      self.start_step = meta["step"]
    self.params, self.opt_state = params, opt_state
    self.metrics_path = out / "metrics.jsonl"
    self.history = (
        _read_metrics(self.metrics_path, self.start_step) if cfg.resume else []
    )
    self._write("config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    self._write(
        MODEL_FILE,
        json.dumps(dataclasses.asdict(self.model_config), indent=2),
    )
    self._write(
        "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history)
    )
    self.train_step, self.step_memory = placement.compile_step(
        self.step_fn, params, opt_state, self._batch(self.start_step)
    )
    self.eval_step = placement.jit_eval(self.eval_fn)
    # what steps() has done so far
    self.step = self.start_step
    self.saved_step = self.start_step if cfg.resume else None
    self.step_times, self.refresh_times, self.wall_s = [], [], 0.0
    if self.verbose:
      self._banner()

  def _close(self) -> None:
    self.checkpointer.close()
    for tracker in self.trackers:
      tracker.close()
    self.trackers = []

  def _banner(self) -> None:
    cfg, memory = self.cfg, self.memory
    print(
        f"{cfg.model} {model_name(cfg)}: {self.n_params / 1e6:.2f}M params;"
        f" data: {self.data.description}"
    )
    print(
        f"optimizer {cfg.optimizer}"
        + (
            f" (rank {cfg.rank}, T {cfg.update_proj_gap}, scale {self.scale}, "
            f"{cfg.proj_type})"
            if OPTIMIZERS[cfg.optimizer].per_matrix
            else ""
        )
        + f": state {report.human_bytes(memory.state_bytes)} vs AdamW's "
        f"{report.human_bytes(memory.adamw_bytes)} ({memory.state_ratio:.0%})"
        + (f"; resuming at step {self.start_step}" if self.start_step else "")
    )
    if self.placement.size > 1:
      print(f"devices: {self.placement.describe()}")

  def steps(self, stop_after: Optional[int] = None) -> None:
    """Trains on to ``--steps``, or ``stop_after`` steps more, logging,
    evaluating and checkpointing on the way; a later call goes on from there.

    Raises:
      TrainingDiverged: when the loss becomes non-finite (after closing logs
        and checkpoints).
    """
    cfg, placement, objective = self.cfg, self.placement, self.objective
    start = self.step
    unit, per_step = objective.unit, objective.items_per_step(cfg)
    progress = Progress(cfg.steps, unit, start) if self.verbose else None
    end = (
        cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    )
    step_times, refresh_times = self.step_times, self.refresh_times
    window = []
    bases = None  # bases computed so far, as the last step returned it
    t_begin = time.perf_counter()
    params, opt_state, checkpointer = (
        self.params,
        self.opt_state,
        self.checkpointer,
    )
    log = open(self.metrics_path, "a") if self.lead else None
    try:
      for step in range(start, end):
        t0 = time.perf_counter()
        params, opt_state, metrics = self.train_step(
            params, opt_state, self._batch(step)
        )
        loss, computed = float(metrics["loss"]), int(metrics["bases_computed"])
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
          kept = (
              f"the last checkpoint kept is step {self.saved_step} in"
              f" {checkpointer.path}"
              if self.saved_step is not None
              else "no checkpoint was kept"
          )
          raise TrainingDiverged(
              f"the loss became {loss} at step {step + 1}; {kept}"
          )
        if step > self.start_step:  # the first step may still warm up
          step_times.append(dt)
          if bases is not None and computed > bases:
            # a step that computed bases, whatever the schedule
            refresh_times.append(dt)
        bases = computed
        window.append(loss)
        self.step = done = step + 1
        row = None
        if (
            done % cfg.log_every == 0
            or done % cfg.eval_every == 0
            or done == end
        ):
          median = float(np.median(step_times)) if step_times else 0.0
          rate = per_step / median if median else 0.0
          row = {
              "step": done,
              "loss": float(np.mean(window)),
              "lr": float(self.schedule(step // cfg.grad_accum)),
              f"{unit}_per_s": rate,
          }
          window = []
          if self.verbose:
            progress.show(
                done, row["loss"], row["lr"], rate, (cfg.steps - done) * median
            )
        if done % cfg.eval_every == 0 or done == cfg.steps:
          row.update(
              evaluate(
                  objective, cfg, self.eval_step, params, self.data, placement
              )
          )
          if self.verbose:
            progress.note(
                "  eval "
                + "  ".join(
                    f"{k} {v:.4f}"
                    for k, v in row.items()
                    if k.startswith("val")
                )
            )
        if row:
          self.history.append(row)
          if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
          for tracker in self.trackers:
            tracker.log(done, row)
        # pmap's to_checkpoint copies: only when saving
        if checkpointer.due(done, force=done == end):
          meta = {
              "step": done,
              "config": cfg.identity(),
              "rng": {"seed": cfg.seed, "data_position": done},
          }
          checkpointer.save(
              done,
              placement.to_checkpoint(params),
              placement.to_checkpoint(opt_state),
              meta,
          )
          self.saved_step = done
    except BaseException:
      self._close()  # what was saved is kept; the run ends here
      raise
    finally:
      self.params, self.opt_state = params, opt_state
      if progress is not None:
        progress.close()
      if log:
        log.close()
      self.wall_s += time.perf_counter() - t_begin

  def finish(self) -> RunResult:
    """The summary (written to ``DIR/summary.json``, with the loss plot, and
    printed), the params and the optimizer state, unpacked and unsharded."""
    cfg, placement = self.cfg, self.placement
    t0 = time.perf_counter()
    self._close()  # the last save written out: part of the run
    self.wall_s += time.perf_counter() - t0
    summary = self.summary()
    params = placement.to_checkpoint(self.unpack(self.params))
    opt_state = placement.to_checkpoint(self.opt_state)
    summary["per_device"] = _per_device(
        placement, params, opt_state, self.step_memory
    )
    if cfg.uses_galore:
      summary["refresh"].update(
          galore_optax.refresh_stats(opt_state, cfg.update_proj_gap)
      )
    self._write("summary.json", json.dumps(summary, indent=2))
    if self.lead:
      report.plot_losses(
          {cfg.optimizer: self.history},
          self.out / "loss.png",
          f"{cfg.model} {cfg.preset}",
          report.entropy_line(summary),
      )
    if self.verbose:
      print(report.describe_summary(summary))
    return RunResult(summary, params, opt_state)

  def summary(self) -> dict:
    """What the steps so far came to: losses, validation metrics, speed,
    memory, refreshes."""
    cfg, objective, memory = self.cfg, self.objective, self.memory
    history, step_times = self.history, self.step_times
    evals = [r for r in history if "val_loss" in r]
    median = float(np.median(step_times)) if step_times else float("nan")
    summary = {
        "model": cfg.model,
        "objective": cfg.objective,
        "preset": cfg.preset,
        "optimizer": cfg.optimizer,
        "finished": self.step == cfg.steps,
        "steps": history[-1]["step"] if history else 0,
        "final_train_loss": history[-1]["loss"] if history else None,
        **(
            {k: v for k, v in evals[-1].items() if k.startswith("val")}
            if evals
            else {}
        ),
        f"{objective.unit}_per_s": (
            objective.items_per_step(cfg) / median if step_times else None
        ),
        "median_step_ms": 1000 * median,
        "wall_time_s": self.wall_s,
        "param_bytes": memory.param_bytes,
        "optimizer_state_bytes": memory.state_bytes,
        "adamw_state_bytes": memory.adamw_bytes,
        "optimizer_state_vs_adamw": memory.state_ratio,
        **objective.summary_extras(self.data),
    }
    if cfg.uses_galore:
      # Timed at the steps that computed bases; amortised over the timed
      # steps.
      refresh_times = self.refresh_times
      refresh_ms = (
          1000 * float(np.mean(refresh_times)) if refresh_times else None
      )
      summary["refresh"] = {
          "every": cfg.update_proj_gap,
          "svd": cfg.svd,
          "moments": cfg.moments,
          "refresh_steps_timed": len(refresh_times),
          "mean_refresh_step_ms": refresh_ms,
          "amortised_overhead": (
              (refresh_ms / (1000 * median) - 1)
              * len(refresh_times)
              / len(step_times)
              if refresh_times
              else None
          ),
      }
    if self.scale is not None:
      summary["scale"] = self.scale
    if cfg.lora_rank:
      summary["trainable_params"] = int(self.n_trainable)
    summary["out"] = str(self.out)
    return summary


def train(
    cfg: TrainConfig, stop_after: Optional[int] = None, verbose: bool = True
) -> RunResult:
  """Runs (or resumes) the training ``cfg`` describes: a :class:`Run`, set up,
  stepped and summed up.

  ``stop_after`` ends this invocation after that many steps, with a checkpoint,
  as a preempted job would; ``--resume`` then continues it.

  Raises:
    TrainingDiverged: when the loss becomes non-finite (after closing logs and
      checkpoints).
  """
  run = Run(cfg, verbose)
  if run.cfg.dry_run:
    return run.dry_run()
  run.start()
  run.steps(stop_after)
  return run.finish()


def _per_device(placement, params, opt_state, step_memory) -> dict:
  return {
      "devices": placement.size,
      "processes": jax.process_count(),
      "layout": placement.describe(),
      "param_bytes": parallel.bytes_per_device(params),
      "optimizer_state_bytes": parallel.bytes_per_device(opt_state),
      "xla_train_step": step_memory,
  }
