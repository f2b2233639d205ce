"""``python -m train {gpt2,vit,bert} [flags]``: train with GaLore (or any listed
optimizer)."""

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
  p.add_argument("task", choices=sorted(config_lib.TASKS))
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


def main(argv=None) -> int:
  args = vars(parser().parse_args(argv))
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
