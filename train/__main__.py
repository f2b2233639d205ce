"""``python -m train MODEL [flags]``: train a model of
:data:`models.registry.MODELS` on its objective (or ``--objective``'s) with
GaLore or any listed optimizer; ``python -m train export|sample RUN``: hand a
run to Hugging Face, or see what it learnt. ``--config FILE`` starts from a
run's ``config.json`` (or a YAML file of the same fields); the flags given
override it.

The flags are :class:`train.config.TrainConfig`'s fields, parsed by tyro
(chosen over draccus and simple-parsing for its typed, annotation-driven
parsing with no conventions of its own to learn: ``Optional`` fields take
``None``, booleans get ``--no-`` forms, so a ``--config`` file's true flag can
be turned off), plus ``--config``, ``--compare`` and ``--stop-after``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import typing
from typing import Annotated
from typing import Optional

import tyro

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

DESCRIPTION = (
    "Train MODEL on its objective (or --objective's) with GaLore or any listed"
    " optimizer. --config FILE starts from a run's config.json or a YAML file"
    " of the same fields; the flags given override it. Also: python -m train"
    " export RUN --out DIR (a Hugging Face checkpoint), python -m train sample"
    " RUN --prompt TEXT (what a causal LM learnt)."
)

# The invocation's own flags, beside TrainConfig's: (name, type, help).
EXTRA_FLAGS = (
    (
        "config",
        Optional[pathlib.Path],
        (
            "a run's config.json, or a YAML file of the same fields: its values"
            " are the defaults, the flags given override them (its out, resume"
            " and overwrite are not taken: the run goes where these flags say)"
        ),
    ),
    (
        "compare",
        Optional[str],
        (
            "comma-separated optimizers to train on the same data and seed,"
            " e.g. galore_adamw,adamw"
        ),
    ),
    (
        "stop_after",
        Optional[int],
        (
            "end this invocation after that many steps, with a checkpoint"
            " (resume with --resume)"
        ),
    ),
)


def _no_none_default(default: str) -> str:
  # a None default is filled in by TrainConfig; its help says how
  return "" if default == "None" else f"(default: {default})"


def _arg(kind, help_text: str, *markers, metavar=None) -> type:
  """``kind`` annotated for tyro: its help, and the metavar of the type it
  takes (``INT`` rather than ``{None}|INT``)."""
  inner = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
  metavars = {int: "INT", float: "FLOAT", str: "STR", pathlib.Path: "FILE"}
  conf = tyro.conf.arg(
      help=help_text,
      metavar=metavar or metavars.get(inner[0]),
      help_behavior_hint=_no_none_default,
  )
  return Annotated[(kind, *markers, conf)]


def flags_class() -> type:
  """A dataclass of TrainConfig's fields (without its checks and filled-in
  defaults, which run when the TrainConfig is built) and
  :data:`EXTRA_FLAGS`, annotated for tyro: the model is positional, and
  required unless ``--config`` names it."""
  types = typing.get_type_hints(config_lib.TrainConfig)
  fields = []
  for field in dataclasses.fields(config_lib.TrainConfig):
    help_text = field.metadata["help"]
    if field.name == "model":
      kind = _arg(
          Optional[str], help_text, tyro.conf.Positional, metavar="MODEL"
      )
      fields.append(("model", kind, dataclasses.field(default=None)))
    else:
      kind = _arg(types[field.name], help_text)
      fields.append(
          (field.name, kind, dataclasses.field(default=field.default))
      )
  for name, kind, help_text in EXTRA_FLAGS:
    fields.append((name, _arg(kind, help_text), None))
  return dataclasses.make_dataclass("Flags", fields)


Flags = flags_class()


def compared_configs(args: dict, names: list[str]) -> dict:
  """``--compare``'s configs, every one checked before anything trains. Each
  optimizer takes the flags it has (``--svd`` goes to galore_adamw, not to
  adamw); a flag none of them has is refused."""
  defaults = config_lib.field_defaults()
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
        ", ".join(f"--{config_lib.flag_name(k)}" for k in sorted(given))
        + " is an option of none of the compared optimizers ("
        + ", ".join(names)
        + ")"
    )
  return configs


# Where a run goes is this invocation's business, not the file's.
NOT_FROM_FILE = ("out", "resume", "overwrite")


def file_defaults(path: pathlib.Path) -> dict:
  """``--config``'s values: the TrainConfig fields of a JSON or YAML file
  (:func:`train.config.upgrade`d), without :data:`NOT_FROM_FILE` and without
  nulls (a null is a default left to the model and optimizer)."""
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
  values = config_lib.upgrade(values)
  fields = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(
        f"--config {path}: {', '.join(map(repr, unknown))} is not a field of"
        " the training config"
    )
  types = typing.get_type_hints(config_lib.TrainConfig)
  return {
      # a number where the flag takes text (--scale 0.25 or rms) as the flag
      # would give it
      k: str(v) if str in typing.get_args(types[k]) else v
      for k, v in values.items()
      if k not in NOT_FROM_FILE and v is not None
  }


def parse(argv=None) -> dict:
  """The flags as TrainConfig fields (plus ``compare``, ``stop_after``):
  ``--config``'s values, overridden by the flags given."""
  argv = sys.argv[1:] if argv is None else list(argv)
  find_config = argparse.ArgumentParser(add_help=False)
  find_config.add_argument("--config", type=pathlib.Path)
  config = find_config.parse_known_args(argv)[0].config
  from_file = {} if config is None else file_defaults(config)
  own_defaults = Flags()
  args = dataclasses.asdict(
      tyro.cli(
          Flags,
          args=argv,
          prog="python -m train",
          description=DESCRIPTION,
          default=dataclasses.replace(own_defaults, **from_file),
      )
  )
  del args["config"]
  if args["model"] is None:
    raise ValueError("give the model to train (e.g. gpt2), or --config FILE")
  if args["optimizer"] in OPTIMIZERS:  # an unknown one: TrainConfig says so
    # the file's flags of another optimizer do not follow a new --optimizer
    for name in OPTIMIZERS[args["optimizer"]].unused_flags:
      if name in from_file and args[name] == from_file[name]:
        args[name] = getattr(own_defaults, name)
  return args


def export_command(
    run: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")],
    out: str,
) -> str:
  """Write RUN's newest checkpoint as a Hugging Face checkpoint (config.json,
  model.safetensors and the run's tokenizer) that from_pretrained loads.

  Args:
    run: the run directory.
    out: the directory to write.
  """
  from train import export

  return f"wrote {export.export(run, out)} to {out}"


def sample_command(
    run: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")],
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
  """Continue PROMPT with RUN's causal language model.

  Args:
    run: the run directory.
    prompt: the text to continue.
    max_new_tokens: tokens to write.
    temperature: 0 for the most likely token each time (greedy); else the
      softmax temperature of sampling.
    top_p: sample from the most likely tokens whose probabilities sum to this.
    seed: of the sampling.
  """
  from train import sample

  return prompt + sample.sample(
      run, prompt, max_new_tokens, temperature, top_p, seed
  )


# python -m train COMMAND ...: what is not training
COMMANDS = {"export": export_command, "sample": sample_command}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in COMMANDS:
    command = COMMANDS[argv[0]]
    try:
      print(tyro.cli(command, args=argv[1:], prog=f"python -m train {argv[0]}"))
      return 0
    except (ValueError, OSError) as e:  # CheckpointMismatch, TokenizerError
      print(f"error: {e}", file=sys.stderr)
      return 2
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
            pathlib.Path("runs") / f"{base.model}-compare", pathlib.Path.exists
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
        f"{base.model} {base.preset}: " + " vs ".join(names),
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
