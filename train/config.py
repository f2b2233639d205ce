"""Training configuration: one dataclass, with per-objective and
per-optimizer defaults, checked in one place."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import galore_optax
from models.registry import MODELS
from models.transformer import DTYPES
from train import trackers
from train.objectives import OBJECTIVES
from train.objectives import default_objective
from train.objectives import objectives_of
from train.optimizers import OPTIMIZER_FLAGS
from train.optimizers import OPTIMIZERS

CONTRASTIVE_BATCHES = ("random", "distinct")


def flag_name(name: str) -> str:
  """A field's flag without its dashes: ``warmup_steps`` -> ``warmup-steps``."""
  return name.replace("_", "-")


def upgrade(saved: dict) -> dict:
  """A config saved by an earlier version (``config.json``, a checkpoint's
  or a benchmark ledger's) in today's fields: ``task`` is now ``model``,
  ``objective`` was the model's own (or sequence_classification, fine-tuning),
  and adamw8bit quantized the embeddings' moments.
  """
  saved = dict(saved)
  if saved.get("optimizer") == "adamw8bit":
    # before the flag, adamw8bit quantized every leaf of at least min_size
    saved.setdefault("quantize_embeddings", True)
  if "task" in saved:
    saved["model"] = saved.pop("task")
  if "objective" not in saved and saved.get("model") in MODELS:
    saved["objective"] = (
        "sequence_classification"
        if saved.get("finetune")
        else default_objective(saved["model"])
    )
  return saved


def default_rank(d_model: int) -> int:
  """The low-rank optimizers' default rank: d_model / 4, as the paper's."""
  return d_model // 4


def _field(default, help_text: str):
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a run; saved as ``DIR/config.json``."""

  model: str = _field("gpt2", "the model: " + ", ".join(MODELS))
  objective: Optional[str] = _field(
      None,
      "what it is trained to do: "
      + ", ".join(OBJECTIVES)
      + " (default: the model's own; with --finetune, sequence_classification)",
  )
  preset: str = _field("cpu", "model size: see models.registry.MODELS")
  init: Optional[str] = _field(
      None,
      "start from pretrained weights: a run directory of ours (its newest"
      " checkpoint), hf:NAME or a directory saved by transformers'"
      " save_pretrained (config.json + safetensors); the architecture is the"
      " checkpoint's, --preset is not used",
  )
  finetune: Optional[str] = _field(
      None,
      "sequence_classification's task (and that objective, if --objective is"
      " not given): stdlib:next (the default) or stdlib:order (offline, from"
      " the embedded data), or glue:NAME",
  )
  optimizer: Optional[str] = _field(
      None,
      "one of "
      + ", ".join(OPTIMIZERS)
      + " (default: galore_adamw; adamw with --lora-rank, whose adapters take"
      " a full-rank optimizer)",
  )
  rank: Optional[int] = _field(
      None, "GaLore rank r (default: d_model // 4; 1 for apollo_mini)"
  )
  lora_rank: Optional[int] = _field(
      None,
      "the LoRA baseline: rank-r adapters (flax's nnx.LoRA) on the matrices"
      " GaLore targets, base weights frozen, adapters and head trained, with"
      " a full-rank --optimizer (adamw)",
  )
  lora_train_rest: bool = _field(
      False,
      "with --lora-rank: train every parameter but the adapted layers' base"
      " weights (embeddings, norms, output), as the LoRA pretraining"
      " baselines of ReLoRA and GaLore do",
  )
  update_proj_gap: int = _field(
      50, "GaLore T: steps between subspace refreshes"
  )
  scale: Optional[str] = _field(
      None,
      "GaLore alpha, the factor of the back-projected update: a number (0.25"
      " with --lr 1e-2 is the paper's recipe) or a rule that restores a"
      " full-rank update's size per matrix, so that the learning rate of"
      " AdamW suits every leaf: rms (the default: sqrt(side / rank); side /"
      " rank for APOLLO, which multiplies by sqrt(scale))"
      " or norm (||G|| / ||projected G||, for galore_sgd, its default)."
      " contrib_galore takes a number (default 0.25)",
  )
  scaling_type: Optional[str] = _field(
      None,
      "APOLLO: the norm ratio per channel or per tensor (default: channel;"
      " tensor for apollo_mini)",
  )
  proj_type: str = _field(
      "std", "GaLore projection: std, reverse_std, left, right or full"
  )
  svd: str = _field(
      "exact", "how bases are computed: exact, randomized or gram"
  )
  moments: str = _field(
      "keep", "the subspace moments at a refresh: keep, reset or transport"
  )
  lazy_threshold: Optional[float] = _field(
      None, "turn on lazy refresh with this basis-similarity threshold"
  )
  lazy_patience: int = _field(
      5, "similar refreshes in a row before a layer's interval doubles"
  )
  moment_bits: Optional[int] = _field(
      None, "GaLore: keep the inner optimizer's moments in 8 bits (8)"
  )
  projector_bits: Optional[int] = _field(
      None, "GaLore: keep the bases block-wise in INT8 or INT4 (8 or 4)"
  )
  quantize_embeddings: bool = _field(
      False,
      "adamw8bit: quantize the embedding tables' moments too (default: kept"
      " in float32, as bitsandbytes' StableEmbedding keeps them)",
  )
  lr: Optional[float] = _field(
      None,
      "peak learning rate (default: per optimizer; a third of it for bert)",
  )
  schedule: str = _field(
      "cosine", "cosine (linear warmup, cosine to 10%) or constant"
  )
  warmup_steps: Optional[int] = _field(
      None, "warmup steps (default: 10% of steps)"
  )
  weight_decay: float = _field(0.0, "decoupled weight decay on matrices")
  clip: float = _field(1.0, "global gradient-norm clipping; 0 turns it off")
  grad_accum: int = _field(
      1,
      "micro-batches per optimizer update (optax.MultiSteps); --steps and"
      " --warmup-steps count micro-batches",
  )
  layerwise: bool = _field(
      False,
      "update each block as soon as its gradient exists, so the whole gradient"
      " is never alive (see train/layerwise.py)",
  )
  remat: Optional[str] = _field(
      None,
      "none or block: recompute each block's activations in the backward pass"
      " (default: block with --layerwise, else none)",
  )
  param_dtype: str = _field(
      "float32", "dtype of the parameters: float32 or bfloat16"
  )
  compute_dtype: str = _field(
      "float32",
      "dtype of the computation: float32 or bfloat16 (mixed precision with"
      " float32 parameters)",
  )
  dry_run: bool = _field(
      False,
      "compile the train step on abstract shapes, print its per-device bytes"
      " (also into summary.json) and exit without training",
  )
  steps: Optional[int] = _field(
      None, "training steps (default: per objective, 800 for causal_lm)"
  )
  batch_size: Optional[int] = _field(
      None,
      "sequences or images per step (default: per objective, 16 for causal_lm)",
  )
  seq_len: int = _field(128, "tokens per sequence (text objectives)")
  vocab_size: Optional[int] = _field(
      None,
      "causal_lm: the model's vocabulary (default: the data's; at least"
      " that), e.g."
      " 50257 to plan GPT-2's memory on byte data",
  )
  data: Optional[str] = _field(
      None, "stdlib or digits (the defaults), a local path, or hf:NAME[:CONFIG]"
  )
  max_data_bytes: int = _field(8 * 2**20, "read at most this much text")
  memmap: bool = _field(
      False,
      "causal_lm: tokenize all of --data (local files) once into memory-mapped"
      " token files beside it (DATA.tokens/) and train from them, for corpora"
      " larger than memory",
  )
  tokenizer: str = _field(
      "bytes",
      "text objectives: bytes (256 tokens), bpe:N (a byte-level BPE of"
      " N tokens trained on the training split, kept in the run directory) or"
      " hf:NAME (a pretrained tokenizer: a Hub name or a local directory)",
  )
  contrastive_batches: Optional[str] = _field(
      None,
      "contrastive: how training pairs are drawn: distinct (the default: no"
      " image or caption twice in a batch) or random (with replacement)",
  )
  seed: int = _field(0, "seed of the initialisation and of the batch order")
  out: Optional[str] = _field(
      None,
      "output directory (default: a new runs/<model>, runs/<model>-1, ...)",
  )
  resume: bool = _field(
      False, "continue from the latest intact checkpoint in --out"
  )
  overwrite: bool = _field(
      False,
      "start afresh in an --out that holds a run, replacing its checkpoints and"
      " logs",
  )
  log_every: int = _field(10, "steps between progress lines and metrics rows")
  eval_every: int = _field(50, "steps between evaluations")
  eval_batches: int = _field(
      8, "validation batches per evaluation (causal_lm, masked_lm)"
  )
  checkpoint_every: int = _field(100, "steps between checkpoints")
  keep_checkpoints: int = _field(2, "checkpoints kept")
  log_to: Optional[str] = _field(
      None,
      "also send the metrics to these trackers, comma-separated: tensorboard"
      " (DIR/tensorboard), wandb (offline in DIR/wandb unless WANDB_MODE is"
      " set)",
  )
  mesh: Optional[str] = _field(
      None, "device mesh, e.g. data=2,fsdp=2 (default: data over all devices)"
  )
  mesh_axes: str = _field(
      "explicit",
      "mesh axis types: explicit (shardings in the types) or auto (XLA's"
      " choice)",
  )
  parallel: str = _field(
      "mesh",
      "mesh (jit over --mesh) or pmap (data parallel with jax.pmap, one"
      " process)",
  )
  coordinator: Optional[str] = _field(
      None, "HOST:PORT of process 0 for a multi-process run"
  )
  num_processes: Optional[int] = _field(
      None, "processes in a multi-process run"
  )
  process_id: Optional[int] = _field(
      None, "this process's index in a multi-process run"
  )
  distributed: bool = _field(
      False,
      "let jax.distributed.initialize() detect the cluster (TPU pods, SLURM)",
  )

  def __post_init__(self):
    if self.model not in MODELS:
      raise ValueError(
          f"unknown model {self.model!r}; choose one of {tuple(MODELS)}"
      )
    self._check_objective()
    objective = OBJECTIVES[self.objective]
    if self.contrastive_batches is not None and (
        self.contrastive_batches not in CONTRASTIVE_BATCHES
    ):
      raise ValueError(
          f"unknown --contrastive-batches {self.contrastive_batches!r};"
          f" choose one of {CONTRASTIVE_BATCHES}"
      )
    if self.contrastive_batches is None and "contrastive_batches" in (
        objective.flags
    ):
      self.contrastive_batches = "distinct"
    if self.log_to is not None:
      self.log_to = ",".join(trackers.parse(self.log_to)) or None
    model = MODELS[self.model]
    if self.preset not in model.presets:
      raise ValueError(
          f"unknown {self.model} preset {self.preset!r}; choose one of"
          f" {sorted(model.presets)}"
      )
    if self.optimizer is None:
      self.optimizer = "adamw" if self.lora_rank is not None else "galore_adamw"
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(
          f"unknown optimizer {self.optimizer!r}; choose one of"
          f" {sorted(OPTIMIZERS)}"
      )
    spec = OPTIMIZERS[self.optimizer]
    if self.weight_decay and not spec.weight_decay:
      raise ValueError(
          f"--optimizer {self.optimizer} takes no weight decay; use its 'w'"
          " variant"
      )
    defaults = field_defaults()
    for name in spec.unused_flags:
      # None: left out by an earlier check of this config
      if getattr(self, name) not in (None, defaults[name]):
        hint = (
            " (for 8-bit AdamW use --optimizer adamw8bit)"
            if name == "moment_bits"
            else ""
        )
        raise ValueError(
            f"--{flag_name(name)} is not an option of --optimizer"
            f" {self.optimizer}, which takes "
            + (
                ", ".join(f"--{flag_name(f)}" for f in spec.flags)
                if spec.flags
                else "none of the low-rank flags"
            )
            + hint
        )
      setattr(self, name, None)  # config.json records only what the run uses
    for name, choices in (
        ("proj_type", galore_optax.PROJ_TYPES),
        ("svd", galore_optax.SVD_METHODS),
        ("moments", galore_optax.MOMENT_POLICIES),
    ):
      if name in spec.flags and getattr(self, name) not in choices:
        raise ValueError(
            f"unknown --{flag_name(name)} {getattr(self, name)!r}; choose one"
            f" of {choices}"
        )
    if self.lazy_threshold is None and self.lazy_patience not in (
        None,
        defaults["lazy_patience"],
    ):
      raise ValueError("--lazy-patience is an option of --lazy-threshold")
    for name, allowed in (
        ("moment_bits", galore_optax.quantization.MOMENT_BITS),
        ("projector_bits", galore_optax.quantization.PROJECTOR_BITS),
    ):
      value = getattr(self, name)
      if value is not None and value not in allowed:
        raise ValueError(
            f"--{flag_name(name)} must be one of {allowed}, got {value}"
        )
    if spec.family == "apollo" and self.proj_type == "full":
      raise ValueError(
          f"--optimizer {self.optimizer} projects one side: --proj-type full"
          " is not one of its projections"
      )
    for name, value in spec.defaults.items():
      if getattr(self, name) is None:
        setattr(self, name, value)
    self.scale = self._scale(spec)
    if (
        self.scaling_type is not None
        and self.scaling_type not in galore_optax.scaling.SCALINGS
    ):
      raise ValueError(
          f"unknown --scaling-type {self.scaling_type!r}; choose one of"
          f" {galore_optax.scaling.SCALINGS}"
      )
    if self.mesh_axes not in ("explicit", "auto"):
      raise ValueError(
          f"unknown --mesh-axes {self.mesh_axes!r}; choose 'explicit' or 'auto'"
      )
    if self.parallel not in ("mesh", "pmap"):
      raise ValueError(
          f"unknown --parallel {self.parallel!r}; choose 'mesh' or 'pmap'"
      )
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(
            f"unknown --{flag_name(name)} {getattr(self, name)!r};"
            f" choose one of {tuple(DTYPES)}"
        )
    if self.remat is None:
      self.remat = "block" if self.layerwise else "none"
    if self.remat not in ("none", "block"):
      raise ValueError(
          f"unknown --remat {self.remat!r}; choose 'none' or 'block'"
      )
    if self.grad_accum <= 0:
      raise ValueError(f"--grad-accum must be positive, got {self.grad_accum}")
    if self.layerwise:
      if self.remat != "block":
        raise ValueError(
            "--layerwise recomputes each block in its backward pass: it needs"
            " --remat block (keeping every block's residuals would hold a"
            " second copy of the weights)"
        )
      if self.parallel == "pmap":
        raise ValueError(
            "--layerwise runs on the mesh (data and fsdp axes); drop"
            " --parallel pmap"
        )
      if self.grad_accum > 1 and self.clip:  # see train/layerwise.py
        raise ValueError(
            "--layerwise with --grad-accum needs --clip 0: clipping the"
            " accumulated gradient by its global norm needs every block's"
            " accumulated gradient at once"
        )
    if self.dry_run and self.parallel == "pmap":
      raise ValueError("--dry-run compiles the mesh step; drop --parallel pmap")
    if self.schedule not in ("cosine", "constant"):
      raise ValueError(
          f"unknown schedule {self.schedule!r}; choose 'cosine' or 'constant'"
      )
    if self.resume and not self.out:
      raise ValueError(
          "--resume needs --out: the directory of the run to continue"
      )
    if self.vocab_size is not None and self.init:
      raise ValueError("--vocab-size: with --init the checkpoint's is used")
    for flag, why_not in (
        ("layerwise", model.not_layerwise),
        ("remat", model.not_stacked),
    ):
      if why_not and getattr(self, flag) not in (False, "none"):
        raise ValueError(
            f"--{flag} {'' if flag == 'layerwise' else 'block '}does not run"
            f" {self.model}: {why_not}"
        )
    if self.resume and self.overwrite:
      raise ValueError(
          "--resume continues the run in --out and --overwrite replaces it:"
          " give one"
      )
    for name in ("lr", "weight_decay", "clip"):
      value = getattr(self, name)
      if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"--{flag_name(name)} must be a finite number >= 0, got {value}"
        )
    if self.lr is not None and self.lr <= 0:
      raise ValueError(f"--lr must be positive, got {self.lr}")
    for name, default in objective.defaults.items():
      if getattr(self, name) is None:
        setattr(self, name, default)
    for name in (
        "steps",
        "batch_size",
        "seq_len",
        "update_proj_gap",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "eval_batches",
        "keep_checkpoints",
    ):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(
            f"--{flag_name(name)} must be positive, got {getattr(self, name)}"
        )
    if self.vocab_size is not None and self.vocab_size <= 0:
      raise ValueError(f"--vocab-size must be positive, got {self.vocab_size}")
    if self.lora_rank is not None:
      if self.lora_rank <= 0:
        raise ValueError(f"--lora-rank must be positive, got {self.lora_rank}")
      if spec.family != "full":
        raise ValueError(
            "--lora-rank trains adapters with a full-rank optimizer such as"
            f" adamw, not --optimizer {self.optimizer}"
        )
      if self.stacked:
        raise ValueError(
            "--lora-rank adapts the blocks one by one: drop --layerwise and"
            " --remat block"
        )
    if self.lora_train_rest and self.lora_rank is None:
      raise ValueError("--lora-train-rest goes with --lora-rank")
    if self.rank is not None and self.rank <= 0:
      raise ValueError(f"--rank must be positive, got {self.rank}")
    if "rank" in spec.flags and self.rank is None and not self.init:
      # with --init the checkpoint's width decides (with_model_width, when
      # the run is set up: building a config reads nothing)
      self.rank = default_rank(model.presets[self.preset].d_model)
    self.lr = self.lr or spec.lr * objective.lr_multiplier
    if self.warmup_steps is None:
      self.warmup_steps = max(self.steps // 10, 1)

  def _check_objective(self) -> None:
    """Fills in the objective (the model's default, or the one --finetune
    names) and refuses flags of other objectives."""
    named = f"--objective {self.objective}"
    if self.objective is None and self.finetune:
      self.objective = "sequence_classification"
      named = "--finetune (objective sequence_classification)"
    if self.objective is None:
      self.objective = default_objective(self.model)
    if self.objective not in OBJECTIVES:
      raise ValueError(
          f"unknown objective {self.objective!r}; choose one of"
          f" {tuple(OBJECTIVES)}"
      )
    objective = OBJECTIVES[self.objective]
    if objective.needs not in MODELS[self.model].capabilities:
      raise ValueError(
          f"{named} needs a model that offers"
          f" {objective.needs}, which {self.model} does not; {self.model}"
          f" trains on {', '.join(objectives_of(self.model))}"
      )
    # the flags some objective reads: --tokenizer (any that reads text) and
    # each one's own
    takes = lambda o, name: o.text if name == "tokenizer" else name in o.flags
    defaults = field_defaults()
    for name in dict.fromkeys(
        ["tokenizer", *(f for o in OBJECTIVES.values() for f in o.flags)]
    ):
      if getattr(self, name) != defaults[name] and not takes(objective, name):
        owners = [n for n, o in OBJECTIVES.items() if takes(o, name)]
        raise ValueError(
            f"--{flag_name(name)} is an option of --objective"
            f" {', '.join(owners)}, not of {self.objective}"
        )

  def _scale(self, spec):
    """``--scale`` as the optimizer takes it: a float, the name of a rule it
    accepts (default 'rms'), or None where it takes no scale."""
    if "scale" not in spec.flags:
      return None
    if self.scale is None:
      return "rms"
    rules = galore_optax.step_size.SCALE_RULES
    if self.scale in rules:
      if self.scale not in spec.scale_rules:
        raise ValueError(
            f"--scale {self.scale} is not a rule of --optimizer"
            f" {self.optimizer}"
            + (
                f" (its rules: {', '.join(spec.scale_rules)})"
                if spec.scale_rules
                else ""
            )
            + "; give a number"
        )
      return self.scale
    try:
      scale = float(self.scale)
    except ValueError:
      raise ValueError(
          f"--scale must be a number or one of {rules}, got {self.scale!r}"
      ) from None
    if not (math.isfinite(scale) and scale >= 0):
      raise ValueError(f"--scale must be a finite number >= 0, got {scale}")
    return scale

  def with_model_width(self, d_model: int) -> "TrainConfig":
    """The config with the default rank (d_model // 4) filled in, where the
    optimizer takes one and ``--rank`` was not given."""
    spec = OPTIMIZERS[self.optimizer]
    if "rank" not in spec.flags or self.rank is not None:
      return self
    return dataclasses.replace(self, rank=default_rank(d_model))

  @property
  def stacked(self) -> bool:
    """Whether the model's blocks are stacked and scanned: for the layer-wise
    step, and for remat (XLA's CPU compiler undoes rematerialisation in
    unrolled code, not in a loop)."""
    return self.layerwise or self.remat == "block"

  @property
  def uses_galore(self) -> bool:
    """Whether the optimizer is one of galore_optax's (its state then has
    refresh statistics)."""
    return OPTIMIZERS[self.optimizer].family == "galore"

  def identity(self) -> dict:
    """The fields a checkpoint must agree on to be resumed."""
    keep = (
        "model",
        "objective",
        "preset",
        "init",
        "finetune",
        "lora_rank",
        "lora_train_rest",
        "optimizer",
        *OPTIMIZER_FLAGS,
        "batch_size",
        "seq_len",
        "vocab_size",
        "data",
        "tokenizer",
        "memmap",
        "contrastive_batches",
        "seed",
        "steps",
        "schedule",
        "lr",
        "warmup_steps",
        "weight_decay",
        "clip",
        "grad_accum",
        "layerwise",
        "remat",  # it decides the layout of the params (stacked or not)
        "param_dtype",
        "compute_dtype",
    )
    unused = OPTIMIZERS[self.optimizer].unused_flags
    return {k: getattr(self, k) for k in keep if k not in unused}


def field_defaults() -> dict:
  """Each TrainConfig field's default, before a config fills it in (None
  where the model, objective or optimizer decides)."""
  return {f.name: f.default for f in dataclasses.fields(TrainConfig)}
