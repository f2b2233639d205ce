"""What a run shows a person: the summary in words, loss plots, the comparison
table."""

from __future__ import annotations

import io
import os
import pathlib
import uuid
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt

from galore_optax.memory import human_bytes


def write_atomic(path: pathlib.Path, content: str | bytes) -> None:
  """Writes ``content`` to ``path`` through a temporary file and a rename, so
  that a crash leaves the old file or the new one, never a torn one."""
  path = pathlib.Path(path)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
  # os.open applies the umask to 0o666, as any file the user writes gets
  # (mkstemp would leave 0o600)
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(content.encode() if isinstance(content, str) else content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def plot_losses(
    histories: dict[str, list[dict]],
    path: pathlib.Path,
    title: str,
    baseline: Optional[tuple[str, float]] = None,
) -> None:
  """Train loss (lines) and validation loss (markers) of one or more runs
  against step, with an optional horizontal ``(label, value)`` line such as the
  data's unigram entropy.
  """
  fig, ax = plt.subplots(figsize=(7, 4.2))
  if baseline is not None:
    ax.axhline(baseline[1], color="gray", linestyle=":", label=baseline[0])
  for i, (name, rows) in enumerate(histories.items()):
    color = f"C{i}"
    trains = [r for r in rows if "loss" in r]
    ax.plot(
        [r["step"] for r in trains],
        [r["loss"] for r in trains],
        color=color,
        alpha=0.8,
        label=f"{name} train",
    )
    evals = [r for r in rows if "val_loss" in r]
    ax.plot(
        [r["step"] for r in evals],
        [r["val_loss"] for r in evals],
        "o--",
        color=color,
        label=f"{name} val",
    )
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  write_atomic(path, png.getvalue())


def entropy_line(summary: dict) -> Optional[tuple[str, float]]:
  if "unigram_entropy" not in summary:
    return None
  return "unigram entropy of the data", summary["unigram_entropy"]


def describe_summary(s: dict) -> str:
  lines = [
      (
          "done: "
          if s["finished"]
          else "stopped early (continue with --resume): "
      )
      + f"{s['steps']} steps of {s['optimizer']} in {s['wall_time_s']:.0f}s"
      f" ({s['median_step_ms']:.1f} ms/step)"
  ]
  if "val_loss" not in s:
    lines.append(
        "no validation yet: the run stopped before its first evaluation"
    )
  elif "val_ppl" in s:
    lines.append(
        f"validation loss {s['val_loss']:.4f} nats per token (perplexity"
        f" {s['val_ppl']:.2f}), {s['val_bpb']:.4f} bits per byte; unigram"
        f" entropy of the data {s['unigram_entropy']:.4f} nats per token"
    )
  else:
    rates = ", ".join(
        f"{k[4:].replace('_', ' ')} {v:.1%}"
        if k.endswith("accuracy")
        else f"{k[4:].replace('_', ' ')} {v:.4f}"
        for k, v in s.items()
        if k.startswith("val_") and k != "val_loss" and isinstance(v, float)
    )
    lines.append(
        f"validation loss {s['val_loss']:.4f}" + (f", {rates}" if rates else "")
    )
  lines.append(
      f"optimizer state {human_bytes(s['optimizer_state_bytes'])}, AdamW would"
      f" hold {human_bytes(s['adamw_state_bytes'])}"
      f" ({s['optimizer_state_vs_adamw']:.0%}); params"
      f" {human_bytes(s['param_bytes'])}"
  )
  refresh = s.get("refresh")
  if refresh and refresh["mean_refresh_step_ms"]:
    lines.append(
        f"{refresh['bases_computed']} bases computed ({refresh['svd']} SVD,"
        f" every {refresh['every']} steps"
        + (
            f", {refresh['svds_saved']} saved by lazy refresh"
            if refresh["svds_saved"] > 0
            else ""
        )
        + (
            f", {refresh['refreshes_skipped']} retried: gradient zero or not"
            " finite"
            if refresh["refreshes_skipped"]
            else ""
        )
        + f"): a refresh step took {refresh['mean_refresh_step_ms']:.1f} ms, "
        f"{refresh['amortised_overhead']:+.1%} per step amortised"
    )
  return "\n".join(lines)


def compare_table(summaries: dict[str, dict]) -> str:
  """A Markdown table of final validation loss, optimizer-state bytes and step
  time."""
  first = next(iter(summaries.values()))
  metric = next(
      (
          k
          for k in (
              "val_ppl",
              "val_accuracy",
              "val_masked_accuracy",
              "val_zero_shot_accuracy",
              *first,
          )
          if k in first and k.startswith("val_") and k != "val_loss"
      ),
      "val_metric",  # runs stopped before their first evaluation
  )
  head = (
      "| optimizer | final val loss | "
      + metric.replace("_", " ")
      + " | optimizer state | vs AdamW | ms/step |\n|---|---|---|---|---|---|"
  )
  cell = lambda s, key, spec: format(s[key], spec) if key in s else "-"
  rows = [
      f"| {name} | {cell(s, 'val_loss', '.4f')} | {cell(s, metric, '.4g')} |"
      f" {human_bytes(s['optimizer_state_bytes'])} |"
      f" {s['optimizer_state_vs_adamw']:.0%} | {s['median_step_ms']:.1f} |"
      for name, s in summaries.items()
  ]
  return "\n".join([head, *rows])


def describe_dry_run(s: dict) -> str:
  """The per-device bytes of a dry run's compiled train step, one per line."""
  device = s["per_device"]
  xla = device["xla_train_step"]
  rows = [
      ("parameters", device["param_bytes"]),
      ("optimizer state", device["optimizer_state_bytes"]),
      *(
          (f"XLA {name.replace('_bytes', '').replace('_', ' ')}", xla[name])
          for name in (
              "argument_size_bytes",
              "output_size_bytes",
              "alias_size_bytes",
              "temp_size_bytes",
              "footprint_bytes",
          )
          if name in xla
      ),
  ]
  width = max(len(name) for name, _ in rows)
  return "\n".join(
      [
          f"dry run: {s['model']} {s['preset']} ({s['n_params'] / 1e6:.1f}M"
          f" params), {s['optimizer']}, batch {s['batch_size']}, on"
          f" {device['layout']}; compiled in {s['compile_s']:.1f}s. Per device:"
      ]
      + [f"  {name:<{width}}  {human_bytes(value)}" for name, value in rows]
  )
