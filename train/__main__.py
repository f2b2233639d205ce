"""``python -m train {gpt2,vit,bert,clip} [flags]``: train with GaLore (or any
listed optimizer). ``--config FILE`` starts from a run's ``config.json`` (or a
YAML file of the same fields); the flags given override it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from train import config as config_lib
from train import report
from train.checkpoint import CheckpointError
from train.data import DataError
from train.loop import ConfigError
from train.loop import TrainingDiverged
from train.loop import first_free
from train.loop import train
from train.optimizers import OPTIMIZER_FLAGS
from train.optimizers import OPTIMIZERS
from train.parallel import ParallelError


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m train", description=__doc__)
  p.add_argument("task", nargs="?", choices=sorted(config_lib.TASKS))
  p.add_argument(
      "--config",
      type=pathlib.Path,
      default=None,
      help=(
          "a run's config.json, or a YAML file of the same fields: its values"
          " are the defaults, the flags given override them (its out, resume"
          " and overwrite are not taken: the run goes where these flags say)"
      ),
  )
  for field in dataclasses.fields(config_lib.TrainConfig):
    if field.name == "task":
      continue
    flag = "--" + field.name.replace("_", "-")
    # None where the default depends on the task or optimizer
    default = field.default
    if field.type in ("bool",):
      p.add_argument(flag, action="store_true", help=field.metadata["help"])
    elif "const" in field.metadata:  # a flag whose value may be left out
      p.add_argument(
          flag,
          nargs="?",
          const=field.metadata["const"],
          default=default,
          help=field.metadata["help"],
      )
    else:
      kind = {"int": int, "float": float, "str": str}.get(
          field.type.replace("Optional[", "").rstrip("]"), str
      )
      p.add_argument(
          flag, type=kind, default=default, help=field.metadata["help"]
      )
  p.add_argument(
      "--compare",
      type=str,
      default=None,
      help=(
          "comma-separated optimizers to train on the same data and seed, e.g."
          " galore_adamw,adamw"
      ),
  )
  p.add_argument(
      "--stop-after",
      type=int,
      default=None,
      help=(
          "end this invocation after that many steps, with a checkpoint (resume"
          " with --resume)"
      ),
  )
  return p


def compared_configs(args: dict, names: list[str]) -> dict:
  """``--compare``'s configs, every one checked before anything trains. Each
  optimizer takes the flags it has (``--svd`` goes to galore_adamw, not to
  adamw); a flag none of them has is refused."""
  defaults = {
      f.name: f.default for f in dataclasses.fields(config_lib.TrainConfig)
  }
  given = {k for k in OPTIMIZER_FLAGS if args[k] != defaults[k]}
  if not names:
    raise ValueError("--compare needs optimizer names, e.g. galore_adamw,adamw")
  configs = {}
  for name in names:
    spec = OPTIMIZERS.get(name)
    unused = () if spec is None else spec.unused_flags
    kept = {k: v for k, v in args.items() if k not in unused}
    configs[name] = config_lib.TrainConfig(**{**kept, "optimizer": name})
    given -= set(spec.flags if spec else ())
  if given:
    raise ValueError(
        ", ".join(f"--{k.replace('_', '-')}" for k in sorted(given))
        + " is an option of none of the compared optimizers ("
        + ", ".join(names)
        + ")"
    )
  return configs


# Where a run goes is this invocation's business, not the file's.
NOT_FROM_FILE = ("out", "resume", "overwrite")


def file_defaults(path: pathlib.Path) -> dict:
  """``--config``'s values: the TrainConfig fields of a JSON or YAML file,
  without :data:`NOT_FROM_FILE` and without nulls (a null is a default left
  to the model and optimizer)."""
  try:
    text = path.read_text()
  except OSError as e:
    raise ValueError(f"--config {path}: {e.strerror}") from e
  try:
    if path.suffix in (".yaml", ".yml"):
      import yaml  # the train extra

      values = yaml.safe_load(text)
    else:
      values = json.loads(text)
  except ValueError as e:  # yaml.YAMLError and JSONDecodeError are ValueErrors
    raise ValueError(
        f"--config {path}: not valid {path.suffix[1:] or 'JSON'}: {e}"
    ) from e
  if not isinstance(values, dict):
    raise ValueError(f"--config {path}: expected a mapping of flags to values")
  fields = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(
        f"--config {path}: {', '.join(map(repr, unknown))} is not a field of"
        " the training config"
    )
  return {
      k: v
      for k, v in values.items()
      if k not in NOT_FROM_FILE and v is not None
  }


def parse(argv=None) -> dict:
  """The flags as TrainConfig fields (plus ``compare``, ``stop_after``):
  ``--config``'s values, overridden by the flags given."""
  p = parser()
  config = p.parse_known_args(argv)[0].config
  from_file = {} if config is None else file_defaults(config)
  own_defaults = {k: p.get_default(k) for k in from_file}
  p.set_defaults(**from_file)
  args = vars(p.parse_args(argv))
  del args["config"]
  if args["task"] is None:
    p.error("give the model to train (e.g. gpt2), or --config FILE")
  if args["optimizer"] in OPTIMIZERS:  # an unknown one: TrainConfig says so
    # the file's flags of another optimizer do not follow a new --optimizer
    for name in OPTIMIZERS[args["optimizer"]].unused_flags:
      if name in from_file and args[name] == from_file[name]:
        args[name] = own_defaults[name]
  return args


def main(argv=None) -> int:
  try:
    args = parse(argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  compare, stop_after = args.pop("compare"), args.pop("stop_after")
  try:
    if not compare:
      train(config_lib.TrainConfig(**args), stop_after=stop_after)
      return 0
    names = [n.strip() for n in compare.split(",") if n.strip()]
    configs = compared_configs(args, names)
    base = next(iter(configs.values()))
    out = (
        pathlib.Path(base.out)
        if base.out
        else first_free(
            pathlib.Path("runs") / f"{base.task}-compare", pathlib.Path.exists
        )
    )
    configs = {
        n: dataclasses.replace(cfg, out=str(out / n))
        for n, cfg in configs.items()
    }
    summaries, histories = {}, {}
    for name, cfg in configs.items():
      print(f"\n=== {name} ===")
      summaries[name] = train(cfg, stop_after=stop_after).summary
      histories[name] = [
          json.loads(line)
          for line in (
              (pathlib.Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
          )
      ]
    table = report.compare_table(summaries)
    report.write_atomic(out / "compare.md", table + "\n")
    report.plot_losses(
        histories,
        out / "compare.png",
        f"{base.task} {base.preset}: " + " vs ".join(names),
        report.entropy_line(next(iter(summaries.values()))),
    )
    print(f"\n{table}\n\nwrote {out / 'compare.md'} and {out / 'compare.png'}")
    return 0
  except TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (
      ValueError,
      DataError,
      CheckpointError,
      ConfigError,
      ParallelError,
  ) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
