"""What each low-rank optimizer costs (or gains) in loss, each at its own tuned
learning rate: GPT-2 on the embedded corpus.

The main job's model and budget (GPT-2 ``cpu`` preset, d_model 128; 800 steps of
16 x 128 tokens of the standard-library corpus; warmup 10% then cosine to 10%;
gradient clipping 1.0) for every row. Each row's learning rate is tuned the
same way:

1. a sweep of at least 4 values spanning 10x on the 1-2-5 ladder, at seed 0;
   while the best value is at an end of the sweep, the next value beyond it is
   run too, so the best is never at an edge (up to two extensions);
2. the best value by final validation loss is then run at seeds 1 and 2.

Every finished run's configuration, final validation loss and loss history is
appended to a ledger committed beside the tables
(``benchmarks/results/quality-runs.jsonl``) and reused from there, so the
benchmark can be completed over several sittings, on fresh checkouts too
(``--max-minutes`` stops it between runs); the tables say which rows are still
pending. ``--report`` only writes the tables. The runs' own directories under
``--runs`` are scratch.

    python -m benchmarks.quality [--steps 800] [--rows NAME ...]
        [--max-minutes M] [--report] [--longer STEPS]
    python -m benchmarks.quality --grid
    python -m benchmarks.quality --data PATH   # untuned defaults elsewhere
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import pathlib
import statistics
import time

import numpy as np

from benchmarks.common import machine
from train.config import TrainConfig
from train.config import upgrade
from train.loop import train
from train.optimizers import OPTIMIZERS

LADDER = tuple(float(f"{m}e{e}") for e in range(-5, 1) for m in (1, 2, 5))
SEEDS = (0, 1, 2)
EXTENSIONS = 2  # ladder values a sweep may add beyond its ends

# name -> (TrainConfig overrides, the sweep's first learning rate). Rows run in
# this order, each to completion: the baselines first, then the d/4 rows, then
# d/8. The first rows use the paper's recipe (scale 0.25 for GaLore and Fira;
# APOLLO's own scales), T = 50 for the short run, attention and MLP matrices;
# the rows marked "rms" use the step-size rule (galore_optax.step_size), the
# CLI's default since issue 27, and their sweeps start below AdamW's tuned rate.
ROWS = {
    "optax.adamw": (dict(optimizer="adamw"), 1e-3),
    "galore_adamw r=32 keep": (
        dict(optimizer="galore_adamw", rank=32, scale=0.25),
        2e-3,
    ),
    "fira_adamw r=32": (
        dict(optimizer="fira_adamw", rank=32, scale=0.25),
        2e-3,
    ),
    "apollo_adamw r=32": (
        dict(optimizer="apollo_adamw", rank=32, scale=1.0),
        2e-3,
    ),
    "apollo_mini (r=1)": (dict(optimizer="apollo_mini", scale=128.0), 2e-3),
    "galore_adamw r=32 reset": (
        dict(optimizer="galore_adamw", rank=32, scale=0.25, moments="reset"),
        2e-3,
    ),
    "optax.contrib.galore r=32": (
        dict(optimizer="contrib_galore", rank=32),
        2e-3,
    ),
    "adamw8bit": (dict(optimizer="adamw8bit"), 1e-3),
    "galore_adamw r=16 keep": (
        dict(optimizer="galore_adamw", rank=16, scale=0.25),
        2e-3,
    ),
    # The d/8 rows below start one step up: every d/4 low-rank sweep was worst
    # at 2e-3 (galore r=16 keep's sweep had already run from it).
    "fira_adamw r=16": (
        dict(optimizer="fira_adamw", rank=16, scale=0.25),
        5e-3,
    ),
    "apollo_adamw r=16": (
        dict(optimizer="apollo_adamw", rank=16, scale=1.0),
        5e-3,
    ),
    "galore_adamw r=16 reset": (
        dict(optimizer="galore_adamw", rank=16, scale=0.25, moments="reset"),
        5e-3,
    ),
    "optax.contrib.galore r=16": (
        dict(optimizer="contrib_galore", rank=16),
        5e-3,
    ),
    # The step-size rule (issue 27): at d/4 every matrix of this model gets
    # 2 (APOLLO 4), at d/8 2.83 (APOLLO 8). apollo_mini's rule is its
    # paper's 128 here (a 128-wide side at rank 1), so its row above stands.
    "galore_adamw r=32 rms": (
        dict(optimizer="galore_adamw", rank=32, scale="rms"),
        2e-3,
    ),
    "fira_adamw r=32 rms": (
        dict(optimizer="fira_adamw", rank=32, scale="rms"),
        2e-3,
    ),
    "apollo_adamw r=32 rms": (
        dict(optimizer="apollo_adamw", rank=32, scale="rms"),
        2e-3,
    ),
    "galore_adamw r=16 rms": (
        dict(optimizer="galore_adamw", rank=16, scale="rms"),
        2e-3,
    ),
    "fira_adamw r=16 rms": (
        dict(optimizer="fira_adamw", rank=16, scale="rms"),
        2e-3,
    ),
    "apollo_adamw r=16 rms": (
        dict(optimizer="apollo_adamw", rank=16, scale="rms"),
        2e-3,
    ),
}
BASELINE = "optax.adamw"

# Transfer (--data): the rows as a user runs them on a corpus of their own,
# at the CLI's defaults (rank d/4, the rule, the default learning rate), against
# AdamW tuned on that corpus.
# GaLore tuned there too, to tell the default rate's share of a gap from the
# subspace's.
TRANSFER_ROWS = {
    BASELINE: ROWS[BASELINE],
    "galore_adamw, CLI defaults": (dict(optimizer="galore_adamw"), None),
    "galore_adamw r=32 rms, tuned": ROWS["galore_adamw r=32 rms"],
}

# The seed-0 grid of learning rate x scale for galore_adamw at rank d/4, around
# the rule (2 on every matrix of this model at d/4): where the rule sits.
GRID_SCALES = (0.25, 0.5, 1.0, "rms", 4.0)
GRID_LRS = (2e-3, 5e-3, 1e-2, 2e-2)
GRID_ROWS = {
    f"scale {scale}": (dict(optimizer="galore_adamw", rank=32, scale=scale), 0)
    for scale in GRID_SCALES
}
# At another length, the cells that tell the matrices' rate from the untargeted
# leaves' (the second table of the grid's report), most telling first; the
# last three are the longer configuration's runs.
LONG_GRID_CELLS = (
    ("scale 0.5", 2e-2),
    ("scale 1.0", 5e-3),
    ("scale 0.5", 1e-2),
    ("scale 1.0", 1e-2),
    ("scale 0.25", 1e-2),
    ("scale 1.0", 2e-2),
    ("scale rms", 1e-2),
    ("scale rms", 5e-3),
    ("scale 0.25", 2e-2),
)
# At another length, each of these also at seeds 1 and 2 (seed 0 is a cell
# above, or AdamW's longer run): the paper's recipe, the rule at AdamW's rate,
# and the grid's best cell, against AdamW at its tuned rate.
LONG_GRID_SEEDED = (
    (BASELINE, 5e-3),
    ("scale 0.25", 2e-2),
    ("scale rms", 5e-3),
    ("scale 1.0", 1e-2),
)


class OutOfTime(Exception):
  pass


LEDGER = pathlib.Path("benchmarks/results/quality-runs.jsonl")


# Config fields naming paths in a sitting's scratch directory: where a run's
# files went does not make it another run.
SCRATCH = ("out",)


@dataclasses.dataclass
class Runner:
  """Runs (or reuses from the ledger) one configuration at a time under a
  time budget."""

  runs: pathlib.Path
  steps: int
  ledger: pathlib.Path = LEDGER
  deadline: float = math.inf
  dry: bool = False  # only read finished runs
  # name -> (TrainConfig overrides, the sweep's first learning rate)
  rows: dict = dataclasses.field(default_factory=lambda: ROWS)
  base: dict = dataclasses.field(default_factory=lambda: dict(model="gpt2"))
  score: str = "val_loss"  # a validation metric of the run's summary
  higher_is_better: bool = False
  sweep_points: int = 4  # learning rates of a sweep before any extension
  scratch: tuple[str, ...] = SCRATCH  # config fields not compared

  @classmethod
  def for_sitting(cls, args, steps: int, **fields) -> Runner:
    """The runner of one sitting of a benchmark's CLI: its ``--runs``,
    ``--max-minutes`` and ``--report``."""
    return cls(
        pathlib.Path(args.runs),
        steps,
        deadline=time.time() + 60 * args.max_minutes,
        dry=args.report,
        **fields,
    )

  def value(self, entry: dict) -> float:
    """The run's score; the quantity the sweep optimises."""
    return (
        entry["val"]
        if self.score == "val_loss"
        else entry["metrics"][self.score]
    )

  def best(self, entries: dict) -> float:
    """The learning rate of the best of ``entries`` (lr -> ledger entry)."""
    sign = -1 if self.higher_is_better else 1
    return min(entries, key=lambda lr: sign * self.value(entries[lr]))

  def config(self, name: str, lr: float, seed: int) -> TrainConfig:
    overrides = self.rows[name][0]
    tag = f"{name}-lr{lr:g}-seed{seed}".replace(" ", "_").replace("/", "-")
    return TrainConfig(
        **self.base,
        steps=self.steps,
        seed=seed,
        lr=lr,
        out=str(self.runs / tag),
        overwrite=True,
        checkpoint_every=10**9,
        **overrides,
    )

  def __call__(self, name: str, lr: float, seed: int) -> dict | None:
    """The run's final validation loss and history, or None when it is not
    finished and this sitting may not start it."""
    cfg = self.config(name, lr, seed)
    for entry in read_ledger(self.ledger):
      if same_run(entry["config"], cfg, self.scratch):
        return entry
    if self.dry:
      return None
    if time.time() > self.deadline:
      raise OutOfTime
    train(cfg, verbose=False)
    run_dir = pathlib.Path(cfg.out)
    summary = json.loads((run_dir / "summary.json").read_text())
    history = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    entry = dict(
        config=_as_json(dataclasses.asdict(cfg)),
        val=summary["val_loss"],
        metrics={k: v for k, v in summary.items() if k.startswith("val_")},
        history=[
            {k: row[k] for k in ("step", "loss", "val_loss") if k in row}
            for row in history
        ],
        machine=machine(),
    )
    with self.ledger.open("a") as f:
      f.write(json.dumps(entry) + "\n")
    print(
        f"{name} lr {lr:g} seed {seed}: {self.score} {self.value(entry):.4f}",
        flush=True,
    )
    return entry

  def attempt(self, name: str, lr: float, seed: int) -> dict | None:
    """:meth:`__call__`; past the deadline the runner turns dry (reads the
    ledger only) and the run is pending (None)."""
    try:
      return self(name, lr, seed)
    except OutOfTime:
      self.dry = True
      return None


def read_ledger(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def _as_json(config: dict, scratch=SCRATCH) -> dict:
  return {
      k: v
      for k, v in json.loads(json.dumps(config)).items()
      if k not in scratch
  }


def same_run(saved: dict, cfg: TrainConfig, scratch=SCRATCH) -> bool:
  """Whether the ledger's ``saved`` configuration is a run of ``cfg``. Fields
  added to TrainConfig after the run was made count as equal at their
  defaults; flags the optimizer does not take, and the ``scratch`` fields
  (paths into a sitting's scratch directory), are not compared."""
  # runs made before a config left out the flags its optimizer does not take
  unused = set(OPTIMIZERS[cfg.optimizer].unused_flags)
  saved, wanted, defaults = (
      {k: v for k, v in _as_json(c, scratch).items() if k not in unused}
      for c in (
          upgrade(saved),  # runs of earlier versions
          dataclasses.asdict(cfg),
          dataclasses.asdict(TrainConfig()),
      )
  )
  return set(saved) <= set(wanted) and all(
      saved[k] == v if k in saved else v == defaults[k]
      for k, v in wanted.items()
  )


def tune_rows(runner: Runner, names) -> dict:
  """:func:`tune` of each of ``names`` while the runner's time lasts (then
  only what its ledger holds), and of every other row of ``runner.rows`` from
  the ledger alone, so the report covers runs of other sittings too; in
  ``runner.rows`` order."""
  results = {name: tune_within(name, runner) for name in names}
  runner.dry = True
  return {
      name: results[name] if name in results else tune(name, runner)
      for name in runner.rows
  }


def tune_within(name: str, runner: Runner) -> dict:
  """:func:`tune` while the runner's time lasts, then what its ledger holds."""
  try:
    return tune(name, runner)
  except OutOfTime:
    runner.dry = True
    return tune(name, runner)


def tune(name: str, runner: Runner) -> dict:
  """Row ``name``'s sweep at seed 0 and its best learning rate's seeds; fields
  are missing where runs are pending."""
  start = LADDER.index(runner.rows[name][1])
  lrs = list(LADDER[start : start + runner.sweep_points])
  sweep = {}
  for lr in lrs:
    done = runner(name, lr, SEEDS[0])
    if done is None:
      return dict(sweep=sweep)
    sweep[lr] = done
  for _ in range(EXTENSIONS):
    best = runner.best(sweep)
    i = LADDER.index(best)
    beyond = {lrs[0]: i - 1, lrs[-1]: i + 1}.get(best)
    if beyond is None or not 0 <= beyond < len(LADDER):
      break
    lr = LADDER[beyond]
    done = runner(name, lr, SEEDS[0])
    if done is None:
      return dict(sweep=sweep)
    sweep[lr] = done
    lrs = sorted(sweep)
  best = runner.best(sweep)
  seeds = [sweep[best]]
  for seed in SEEDS[1:]:
    done = runner(name, best, seed)
    if done is None:
      break
    seeds.append(done)
  return dict(sweep=sweep, best=best, seeds=seeds)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--steps", type=int, default=800)
  p.add_argument(
      "--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW"
  )
  p.add_argument(
      "--max-minutes",
      type=float,
      default=math.inf,
      help="start no new run after this many minutes",
  )
  p.add_argument(
      "--report", action="store_true", help="only read finished runs"
  )
  p.add_argument(
      "--longer",
      type=int,
      metavar="STEPS",
      help=(
          "the longer configuration: each tuned row again at its best lr, seed"
          " 0, for STEPS steps"
      ),
  )
  p.add_argument(
      "--grid",
      action="store_true",
      help="galore_adamw's seed-0 grid of learning rate x scale (heat map)",
  )
  p.add_argument(
      "--data",
      metavar="PATH",
      help=(
          "transfer: AdamW tuned on this corpus (a local file or directory of"
          " text) against galore_adamw at the CLI's defaults, untuned"
      ),
  )
  p.add_argument(
      "--runs",
      default=None,
      help=(
          "scratch directory of the runs this sitting makes; what is kept of"
          " them goes to --ledger (default: runs/benchmarks/quality, with"
          " -STEPS for other --steps)"
      ),
  )
  p.add_argument(
      "--ledger",
      type=pathlib.Path,
      default=LEDGER,
      help="the finished runs' record, read and appended to",
  )
  p.add_argument(
      "--out",
      default=None,
      help="the tables' path (default: benchmarks/results/quality[-STEPS])",
  )
  args = p.parse_args(argv)
  suffix = "" if args.steps == 800 else f"-{args.steps}"
  args.runs = args.runs or f"runs/benchmarks/quality{suffix}"
  args.out = args.out or f"benchmarks/results/quality{suffix}"
  runner = Runner.for_sitting(args, args.steps, ledger=args.ledger)
  if args.grid:
    grid(dataclasses.replace(runner, rows=GRID_ROWS), args)
    return
  if args.data:
    base = dict(runner.base, data=args.data)
    transfer(dataclasses.replace(runner, base=base, rows=TRANSFER_ROWS), args)
    return
  results = tune_rows(runner, args.rows)
  longer = {}
  if args.longer:
    long_runner = dataclasses.replace(
        runner, runs=runner.runs / f"longer-{args.longer}", steps=args.longer
    )
    long_runner.dry = args.report
    for name in args.rows:
      if "best" in results[name]:  # None where its run is pending
        longer[name] = long_runner.attempt(
            name, results[name]["best"], SEEDS[0]
        )
  write(results, longer, args)


def transfer(runner: Runner, args) -> None:
  """Tuned AdamW on ``runner.base["data"]`` against galore_adamw at the CLI's
  defaults (3 seeds, no tuning of its own) and tuned there."""
  results = {}
  for name, (overrides, first_lr) in TRANSFER_ROWS.items():
    if first_lr is not None:
      results[name] = tune_within(name, runner)
      continue
    lr = TrainConfig(**runner.base, **overrides).lr
    seeds = [runner.attempt(name, lr, seed) for seed in SEEDS]
    results[name] = dict(
        sweep={}, best=lr, seeds=[e for e in seeds if e is not None]
    )
  args.out += "-transfer"
  write(results, {}, args)


def grid(runner: Runner, args) -> None:
  """Runs (or reads) the grid's cells: all of them at the main job's length,
  :data:`LONG_GRID_CELLS` at any other; writes its tables and heat map."""
  if runner.steps == 800:
    # the rates where both sweeps were best first, so that a sitting cut
    # short has measured what matters most
    cells = [
        (name, lr)
        for lr in sorted(GRID_LRS, key=lambda lr: abs(math.log(lr / 1e-2)))
        for name in GRID_ROWS
    ]
  else:
    cells = LONG_GRID_CELLS
  values = dict.fromkeys(itertools.product(GRID_ROWS, GRID_LRS), "-")
  for name, lr in cells:
    entry = runner.attempt(name, lr, SEEDS[0])
    values[name, lr] = "pending" if entry is None else entry["val"]
  show = lambda v: v if isinstance(v, str) else f"{v:.4f}"
  suffix = "" if runner.steps == 800 else f" --steps {runner.steps}"
  out = pathlib.Path(args.out + "-grid")
  lines = [
      f"`python -m benchmarks.quality --grid{suffix}` — {machine()}",
      "",
      (
          f"galore_adamw, rank 32 of d_model 128, seed 0, {runner.steps}"
          " steps of the main job: final validation loss by learning rate"
          " and scale (the rule, rms, is 2 on every matrix here; '-': not a"
          " cell of this length's grid):"
      ),
      "",
      "| scale | " + " | ".join(f"lr {lr:g}" for lr in GRID_LRS) + " |",
      "|---|" + "---|" * len(GRID_LRS),
  ]
  for name in GRID_ROWS:
    lines.append(
        f"| {name[len('scale ') :]} | "
        + " | ".join(show(values[name, lr]) for lr in GRID_LRS)
        + " |"
    )
  # The same cells by the two rates they set: the matrices move as AdamW
  # would at lr * scale * sqrt(r / k), the untargeted leaves at lr.
  by_rates = {}
  for (name, lr), v in values.items():
    scale = GRID_ROWS[name][0]["scale"]
    factor = 2.0 if scale == "rms" else scale
    by_rates[lr * factor * math.sqrt(32 / 128), lr] = v
  matrix_rates = sorted({m for (m, _), v in by_rates.items() if v != "-"})
  lines += [
      "",
      (
          "The same cells by the two rates they set, in AdamW's terms: the"
          " attention and MLP matrices' (rows: lr x scale x sqrt(r / k)) and"
          " every other leaf's (columns: lr):"
      ),
      "",
      "| matrices \\ other leaves | "
      + " | ".join(f"{lr:g}" for lr in GRID_LRS)
      + " |",
      "|---|" + "---|" * len(GRID_LRS),
  ]
  for m in matrix_rates:
    lines.append(
        f"| {m:g} | "
        + " | ".join(show(by_rates.get((m, lr), "-")) for lr in GRID_LRS)
        + " |"
    )
  if runner.steps != 800:
    lines += _seeded_cells(
        dataclasses.replace(
            runner, rows={**GRID_ROWS, BASELINE: ROWS[BASELINE]}
        )
    )
  text = "\n".join(lines) + "\n"
  print(text)
  out.with_suffix(".md").write_text(text)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  table = np.array([
      [v if isinstance(v, float) else np.nan for v in row]
      for row in ([values[n, lr] for lr in GRID_LRS] for n in GRID_ROWS)
  ])
  image = ax.imshow(table, cmap="viridis_r", aspect="auto")
  for (i, j), v in np.ndenumerate(table):
    if np.isfinite(v):
      ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w")
  ax.set_xticks(range(len(GRID_LRS)), [f"{lr:g}" for lr in GRID_LRS])
  ax.set_yticks(range(len(GRID_ROWS)), [n[len("scale ") :] for n in GRID_ROWS])
  ax.set_xlabel("learning rate")
  ax.set_ylabel("scale")
  ax.set_title(
      f"galore_adamw r=32, seed 0, {runner.steps} steps: final validation loss"
  )
  fig.colorbar(image)
  fig.tight_layout()
  fig.savefig(out.parent / f"{out.name}.png", dpi=100)
  plt.close(fig)


def _seeded_cells(runner: Runner) -> list[str]:
  """Runs (or reads) :data:`LONG_GRID_SEEDED` at every seed, seed by seed so
  that a sitting cut short leaves comparable rows; their table's lines."""
  runs = {
      (name, seed): runner.attempt(name, lr, seed)
      for seed in SEEDS
      for name, lr in LONG_GRID_SEEDED
  }
  vals = {
      name: [runs[name, s]["val"] for s in SEEDS if runs[name, s]]
      for name, _ in LONG_GRID_SEEDED
  }
  base = vals[BASELINE]
  lines = [
      "",
      (
          f"Seeds {', '.join(map(str, SEEDS))} of some cells, against AdamW at"
          " its tuned rate:"
      ),
      "",
      "| cell | lr | val loss by seed | mean ± std | vs AdamW |",
      "|---|---|---|---|---|",
  ]
  for name, lr in LONG_GRID_SEEDED:
    v = vals[name]
    versus = (
        f"{statistics.mean(v) / statistics.mean(base) - 1:+.2%}"
        if len(v) == len(base) == len(SEEDS)
        else "-"
    )
    lines.append(
        f"| {name} | {lr:g} | {', '.join(f'{x:.4f}' for x in v)} |"
        f" {_cell(v)} | {versus} |"
    )
  return lines


def _cell(values: list[float]) -> str:
  if len(values) < len(SEEDS):
    return f"pending ({len(values)} of {len(SEEDS)} seeds)"
  return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def write(results: dict, longer: dict, args) -> None:
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  base = results[BASELINE]
  base_mean = (
      statistics.mean(s["val"] for s in base["seeds"])
      if len(base.get("seeds", ())) == len(SEEDS)
      else None
  )
  command = (
      "python -m benchmarks.quality"
      + (f" --steps {args.steps}" if args.steps != 800 else "")
      + (f" --longer {args.longer}" if args.longer else "")
      + (f" --data {args.data}" if args.data else "")
  )
  corpus = (
      f"of `{args.data}`" if args.data else "of the standard library's source"
  )
  lines = [
      f"`{command}` — {machine()}",
      "",
      (
          f"GPT-2 `cpu` preset (d_model 128), {args.steps} steps of 16 x 128"
          f" tokens {corpus}; each row at its best learning rate of a seed-0"
          " sweep (rows without a sweep at the CLI's default), then seeds"
          f" {list(SEEDS)}; final validation loss:"
      ),
      "",
      (
          "| optimizer | best lr | val loss, mean ± std of 3 seeds | vs tuned"
          " AdamW | sweep at seed 0 (lr: val loss) |"
      ),
      "|---|---|---|---|---|",
  ]
  for name, r in results.items():
    vals = [s["val"] for s in r.get("seeds", ())]
    versus = (
        f"{statistics.mean(vals) / base_mean - 1:+.2%}"
        if base_mean and len(vals) == len(SEEDS)
        else "-"
    )
    sweep = ", ".join(
        f"{lr:g}: {d['val']:.4f}" for lr, d in sorted(r["sweep"].items())
    )
    if "best" not in r:
      sweep += (" — " if sweep else "") + "sweep pending"
    best = f"{r['best']:g}" if "best" in r else "-"
    lines.append(f"| {name} | {best} | {_cell(vals)} | {versus} | {sweep} |")
  if longer:
    lines += [
        "",
        (
            f"The longer configuration: {args.longer} steps, seed {SEEDS[0]},"
            " each row at its tuned lr; validation loss at 1/4, 1/2, 3/4 and"
            " all of the steps:"
        ),
        "",
        "| optimizer | "
        + " | ".join(f"step {s}" for s in _quarters(args.longer))
        + " | vs AdamW |",
        "|---|" + "---|" * 5,
    ]
    base_long = longer.get(BASELINE)
    for name, run in longer.items():
      if run is None:
        lines.append(f"| {name} | " + "pending | " * 5)
        continue
      vals = _val_at(run["history"], _quarters(args.longer))
      versus = f"{run['val'] / base_long['val'] - 1:+.2%}" if base_long else "-"
      lines.append(
          f"| {name} | "
          + " | ".join(f"{v:.4f}" for v in vals)
          + f" | {versus} |"
      )
  text = "\n".join(lines)
  print(text)
  out.with_suffix(".md").write_text(text + "\n")
  out.with_suffix(".json").write_text(
      json.dumps(
          {
              "machine": machine(),
              "command": command,
              "rows": {
                  name: {
                      "sweep": {
                          f"{lr:g}": d["val"] for lr, d in r["sweep"].items()
                      },
                      "best_lr": r.get("best"),
                      "seeds": [s["val"] for s in r.get("seeds", ())],
                  }
                  for name, r in results.items()
              },
              "longer": {
                  name: (
                      run
                      and dict(
                          steps=args.longer,
                          val=_val_at(run["history"], _quarters(args.longer)),
                      )
                  )
                  for name, run in longer.items()
              },
          },
          indent=2,
      )
  )
  curves = {}
  for name, r in results.items():
    # the first seed whose whole history the ledger holds (runs recorded
    # before the ledger kept only their final loss)
    seed, run = next(
        (
            (seed, run)
            for seed, run in zip(SEEDS, r.get("seeds", ()))
            if len(run["history"]) > 1
        ),
        (None, None),
    )
    if run:
      curves[f"{name}, seed {seed}"] = run["history"]
  if curves:
    _plot_validation(
        curves,
        out.parent / f"{out.name}-curves.png",
        "GPT-2 cpu preset, each at its tuned lr",
    )
    _plot_sweeps(results, out.parent / f"{out.name}-lr.png")
  if any(longer.values()):
    _plot_validation(
        {name: run["history"] for name, run in longer.items() if run},
        out.parent / f"{out.name}-longer-curves.png",
        f"GPT-2 cpu preset, {args.longer} steps at the tuned lr, seed 0",
    )


def _quarters(steps: int) -> list[int]:
  return [steps * k // 4 for k in (1, 2, 3, 4)]


def _val_at(history: list[dict], steps: list[int]) -> list[float]:
  val = {row["step"]: row["val_loss"] for row in history if "val_loss" in row}
  return [val[s] for s in steps]


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # files only
  import matplotlib.pyplot as plt

  return plt


def _figure():
  return _pyplot().subplots(figsize=(9, 4.5))


def _save(fig, ax, path: pathlib.Path) -> None:
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  _pyplot().close(fig)


def _plot_validation(curves: dict, path: pathlib.Path, title: str) -> None:
  fig, ax = _figure()
  for name, history in curves.items():
    evals = [row for row in history if "val_loss" in row]
    ax.plot(
        [row["step"] for row in evals],
        [row["val_loss"] for row in evals],
        marker="o",
        markersize=3,
        label=name,
        **_style(name.split(", seed")[0]),
    )
  ax.set_ylim(top=3.0)
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats)")
  ax.set_title(title)
  _save(fig, ax, path)


def _style(name: str) -> dict:
  """One colour per optimizer, the same at both ranks; d/8 rows dashed."""
  family = lambda row: row.replace(" r=16", "").replace(" r=32", "")
  families = list(dict.fromkeys(map(family, [*ROWS, *TRANSFER_ROWS])))
  color = _pyplot().colormaps["tab10"](families.index(family(name)) % 10)
  return dict(color=color, linestyle="--" if "r=16" in name else "-")


def _plot_sweeps(results: dict, path: pathlib.Path) -> None:
  fig, ax = _figure()
  for name in ROWS:
    r = results.get(name)
    if r and r["sweep"]:
      lrs = sorted(r["sweep"])
      ax.plot(
          lrs,
          [r["sweep"][lr]["val"] for lr in lrs],
          marker="o",
          label=name,
          **_style(name),
      )
  ax.set_xscale("log")
  ax.set_ylim(top=2.6)
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel("final validation loss, seed 0 (nats)")
  _save(fig, ax, path)


if __name__ == "__main__":
  main()
