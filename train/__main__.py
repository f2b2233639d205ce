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


def main(argv=None) -> int:
  args = vars(parser().parse_args(argv))
  compare, stop_after = args.pop("compare"), args.pop("stop_after")
  try:
    if not compare:
      train(config_lib.TrainConfig(**args), stop_after=stop_after)
      return 0
    names = [n.strip() for n in compare.split(",") if n.strip()]
    base = config_lib.TrainConfig(**args)
    out = (
        pathlib.Path(base.out)
        if base.out
        else first_free(
            pathlib.Path("runs") / f"{base.task}-compare", pathlib.Path.exists
        )
    )
    configs = {
        n: config_lib.TrainConfig(
            **{**args, "optimizer": n, "out": str(out / n)}
        )
        for n in names
    }  # every config is checked before anything trains
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
