"""The training CLI on tiny presets: every optimizer, outputs, resume, compare
and bad input."""

import dataclasses
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from models.registry import MODELS
from train import config as config_lib
from train import loop
from train import optimizers
from train import report
from train.__main__ import main
from train.__main__ import parse
from train.loop import train

TINY = dict(
    preset="tiny",
    steps=4,
    batch_size=4,
    seq_len=32,
    max_data_bytes=100_000,
    log_every=2,
    eval_every=4,
    eval_batches=2,
    checkpoint_every=2,
)


SMALL = [
    "gpt2",
    "--preset",
    "tiny",
    "--steps",
    "2",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--max-data-bytes",
    "100000",
    "--eval-batches",
    "1",
    "--checkpoint-every",
    "2",
]


def _cfg(tmp_path, **kw):
  """A tiny GPT-2 config; low-rank optimizers refresh every 2 steps."""
  spec = optimizers.OPTIMIZERS[kw.get("optimizer", "galore_adamw")]
  gap = {"update_proj_gap": 2} if "update_proj_gap" in spec.flags else {}
  return config_lib.TrainConfig(
      **{"model": "gpt2", "out": str(tmp_path / "run"), **TINY, **gap, **kw}
  )


@pytest.mark.parametrize("optimizer", sorted(optimizers.OPTIMIZERS))
def test_a_few_steps_with_each_optimizer(tmp_path, optimizer):
  result = train(
      _cfg(tmp_path, optimizer=optimizer, steps=3, eval_every=3), verbose=False
  )
  s = result.summary
  assert s["finished"] and s["steps"] == 3 and np.isfinite(s["val_loss"])
  if optimizer.startswith("galore"):
    assert s["optimizer_state_bytes"] < s["adamw_state_bytes"]
    # 2 layers x 4 matrices, refreshed at steps 0 and 2
    assert (
        s["refresh"]["bases_computed"] == s["refresh"]["fixed_schedule"] == 16
    )


def test_low_rank_defaults_are_the_rule_at_the_full_rank_rate():
  counterpart = {
      "galore_adamw": "adamw",
      "fira_adamw": "adamw",
      "apollo_adamw": "adamw",
      "apollo_mini": "adamw",
      "galore_adam": "adam",
      "galore_sgd": "sgd",
      "galore_adafactor": "adafactor",
      "galore_lion": "lion",
      "galore_lamb": "lamb",
  }
  for model in ("gpt2", "bert", "clip"):
    for low, full in counterpart.items():
      cfg = config_lib.TrainConfig(model=model, optimizer=low)
      assert cfg.lr == config_lib.TrainConfig(model=model, optimizer=full).lr
      assert cfg.scale == ("norm" if low == "galore_sgd" else "rms")
  assert config_lib.TrainConfig(optimizer="contrib_galore").scale == 0.25
  # a number from the command line is the reference's alpha, exactly
  assert config_lib.TrainConfig(scale="0.25").scale == 0.25


def test_a_registered_optimizer_is_offered_and_names_stay_unique():
  spec = optimizers.OPTIMIZERS["adamw"]
  optimizers.register("adamw_again", spec)
  try:
    cfg = config_lib.TrainConfig(optimizer="adamw_again")
    assert cfg.lr == config_lib.TrainConfig(optimizer="adamw").lr
    assert cfg.rank is None
    with pytest.raises(ValueError, match="--optimizer adamw_again is taken"):
      optimizers.register("adamw_again", spec)
  finally:
    del optimizers.OPTIMIZERS["adamw_again"]
  # a checkpoint is matched on the flags its optimizer takes: runs saved
  # before unused flags were left out (svd "exact" for adamw) still resume
  assert "svd" not in config_lib.TrainConfig(optimizer="adamw").identity()
  assert "svd" in config_lib.TrainConfig().identity()


def test_the_banner_names_each_shape_s_factor():
  params = {
      "blocks": {
          "0": {
              "attn": {"query": {"kernel": np.zeros((64, 64))}},
              "mlp": {"fc": {"kernel": np.zeros((64, 256))}},
          }
      },
      "embed": np.zeros((300, 64)),
  }
  scale = lambda **kw: loop.effective_scale(
      config_lib.TrainConfig(**{"rank": 16, **kw}), params
  )
  assert scale() == "rms (64x64 r16: 2, 64x256 r16: 2)"
  assert scale(optimizer="fira_adamw") == scale()
  assert scale(optimizer="apollo_adamw") == "rms (64x64 r16: 4, 64x256 r16: 4)"
  assert scale(optimizer="apollo_mini", rank=None) == (
      "rms (64x64 r1: 64, 64x256 r1: 64)"
  )
  assert scale(proj_type="full") == "rms (64x64 r16: 4, 64x256 r16: 8)"
  assert scale(scale="0.25") == "0.25 (64x64 r16: 0.25, 64x256 r16: 0.25)"
  assert scale(optimizer="galore_sgd").startswith("norm (||G|| / ||R||")
  assert scale(optimizer="contrib_galore") == "0.25"
  assert scale(optimizer="adamw", rank=None) is None


def test_subspace_engine_flags(tmp_path):
  cfg = _cfg(
      tmp_path,
      steps=12,
      eval_every=12,
      svd="randomized",
      moments="transport",
      lazy_threshold=0.0,
      lazy_patience=1,
  )
  refresh = train(cfg, verbose=False).summary["refresh"]
  # every refresh is "similar" at threshold 0: intervals 2, 4, 8 -> refreshes at
  # 0, 2, 6 (not 0, 2, ..., 10)
  assert (refresh["svd"], refresh["moments"]) == ("randomized", "transport")
  assert refresh["bases_computed"] == 8 * 3 and refresh["svds_saved"] == 8 * 3


def test_gpt2_run_writes_metrics_summary_config_and_plot(tmp_path):
  cfg = _cfg(tmp_path, steps=40, eval_every=20, lr=3e-2)
  result = train(cfg, verbose=False)
  out = tmp_path / "run"
  rows = [
      json.loads(line)
      for line in (out / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in rows] == list(range(2, 41, 2))
  assert all({"step", "loss", "lr"} <= r.keys() for r in rows)
  assert "val_loss" in rows[9] and "val_ppl" in rows[-1]
  assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
  summary = json.loads((out / "summary.json").read_text())
  assert (
      summary["val_loss"] == rows[-1]["val_loss"] == result.summary["val_loss"]
  )
  for key in (
      "final_train_loss",
      "tok_per_s",
      "optimizer_state_bytes",
      "adamw_state_bytes",
      "refresh",
      "unigram_entropy",
  ):
    assert summary[key] is not None
  assert summary["val_loss"] < summary["unigram_entropy"]
  # d_model // 4, and the step-size rule: sqrt(64 / 16) on every matrix
  config = json.loads((out / "config.json").read_text())
  assert (config["rank"], config["scale"]) == (16, "rms")
  assert summary["scale"].startswith("rms (64x64 r16: 2, ")
  assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vit_run_reports_accuracy(tmp_path):
  cfg = config_lib.TrainConfig(
      model="vit",
      preset="tiny",
      steps=60,
      batch_size=32,
      eval_every=60,
      log_every=10,
      out=str(tmp_path / "vit"),
      lr=1e-2,
      scale=1.0,
      update_proj_gap=10,
  )
  s = train(cfg, verbose=False).summary
  assert s["val_accuracy"] > 0.2  # well above chance (0.1) after 60 steps
  assert "img_per_s" in s


def test_resume_gives_the_parameters_of_an_uninterrupted_run(tmp_path, capsys):
  whole = train(
      _cfg(tmp_path, out=str(tmp_path / "whole"), steps=6), verbose=False
  )
  cfg = _cfg(tmp_path, out=str(tmp_path / "parts"), steps=6)
  # stopped before its first evaluation (step 4), as a preempted job is
  first = train(cfg, stop_after=3)
  assert not first.summary["finished"] and "val_loss" not in first.summary
  out = capsys.readouterr().out
  assert "stopped early (continue with --resume): 3 steps" in out
  assert "no validation yet" in out
  metrics = tmp_path / "parts" / "metrics.jsonl"
  with open(metrics, "a") as f:
    f.write('{"step": 4, "lo')  # a crash in mid-line
  resumed = train(dataclasses.replace(cfg, resume=True), verbose=False)
  assert resumed.summary["finished"]
  for a, b in zip(
      jax.tree.leaves((whole.params, whole.opt_state)),
      jax.tree.leaves((resumed.params, resumed.opt_state)),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the log continues where it stopped, without the torn line
  rows = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 3, 4, 6]
  # every output gets the umask's mode, as any file the user writes
  umask = os.umask(0)
  os.umask(umask)
  for name in ("config.json", "summary.json", "metrics.jsonl", "loss.png"):
    mode = (tmp_path / "parts" / name).stat().st_mode & 0o777
    assert mode == 0o666 & ~umask, (name, oct(mode))
  # a Run taken step by step in one process is the same run
  run = loop.Run(_cfg(tmp_path, out=str(tmp_path / "stepped"), steps=6), False)
  run.start()
  run.steps(3)
  assert run.step == 3 and not run.summary()["finished"]
  run.steps()
  stepped = run.finish()
  assert stepped.summary["finished"] and stepped.summary["steps"] == 6
  assert stepped.summary["val_loss"] == whole.summary["val_loss"]
  for a, b in zip(
      jax.tree.leaves((whole.params, whole.opt_state)),
      jax.tree.leaves((stepped.params, stepped.opt_state)),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compare_writes_one_table_and_one_plot(tmp_path, capsys):
  out = tmp_path / "cmp"
  # SMALL with 3 steps, evaluated at the end (argparse keeps the last value)
  args = [*SMALL, "--steps", "3", "--eval-every", "3", "--out", str(out)]
  # each optimizer takes the flags it has: --svd goes to GaLore alone
  args += ["--compare", "galore_adamw,adamw", "--svd", "randomized"]
  assert main(args) == 0
  saved = {
      n: json.loads((out / n / "config.json").read_text())
      for n in ("galore_adamw", "adamw")
  }
  assert saved["galore_adamw"]["svd"] == "randomized"
  # a run records only what it used
  assert saved["adamw"]["svd"] is None and saved["adamw"]["rank"] is None
  table = (out / "compare.md").read_text()
  assert "| galore_adamw |" in table and "| adamw |" in table
  assert (out / "compare.png").exists() and (
      out / "galore_adamw" / "summary.json"
  ).exists()
  assert "| adamw |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "huge"], "unknown gpt2 preset 'huge'"),
        (["--optimizer", "adamx"], "unknown optimizer 'adamx'"),
        (
            ["--rank", "1000"],
            (
                "--rank 1000 is larger than the matrix"
                " 'blocks/0/attn/proj/kernel' (64 x 64)"
            ),
        ),
        (
            ["--data", "/nonexistent/corpus"],
            "data path '/nonexistent/corpus' does not exist",
        ),
        (
            ["--seq-len", "4096"],
            "--seq-len 4096 exceeds the max_len of preset 'tiny', 128",
        ),
        (["--compare", "galore_adamw,nope"], "unknown optimizer 'nope'"),
        (["--moment-bits", "4"], "--moment-bits must be one of (8,), got 4"),
        (
            ["--projector-bits", "2"],
            "--projector-bits must be one of (8, 4), got 2",
        ),
        (
            ["--optimizer", "adamw", "--moment-bits", "8"],
            (
                "--moment-bits is not an option of --optimizer adamw, which"
                " takes none of the low-rank flags (for 8-bit AdamW use"
                " --optimizer adamw8bit)"
            ),
        ),
        (
            ["--optimizer", "contrib_galore", "--resume"],
            "contrib_galore's state holds zero-size arrays",
        ),
        (
            ["--optimizer", "apollo_mini", "--svd", "gram"],
            (
                "--svd is not an option of --optimizer apollo_mini, which takes"
                " --rank, --update-proj-gap, --scale, --proj-type,"
                " --scaling-type"
            ),
        ),
        (
            ["--optimizer", "apollo_adamw", "--proj-type", "full"],
            "--proj-type full is not one of its projections",
        ),
        (
            ["--scaling-type", "tensor"],
            "--scaling-type is not an option of --optimizer galore_adamw",
        ),
        (["--scale", "wide"], "--scale must be a number or one of"),
        # flags an optimizer does not take are refused, not ignored
        (
            ["--optimizer", "adamw", "--svd", "randomized"],
            "--svd is not an option of --optimizer adamw",
        ),
        (
            ["--optimizer", "adamw", "--rank", "8"],
            "--rank is not an option of --optimizer adamw",
        ),
        (
            ["--optimizer", "contrib_galore", "--proj-type", "left"],
            (
                "--proj-type is not an option of --optimizer contrib_galore,"
                " which takes --rank, --update-proj-gap, --scale"
            ),
        ),
        (
            ["--lazy-patience", "3"],
            "--lazy-patience is an option of --lazy-threshold",
        ),
        (
            ["--compare", "galore_adamw,adamw", "--scaling-type", "tensor"],
            (
                "--scaling-type is an option of none of the compared optimizers"
                " (galore_adamw, adamw)"
            ),
        ),
        (
            ["--optimizer", "contrib_galore", "--scale", "rms"],
            "--scale rms is not a rule of --optimizer contrib_galore",
        ),
        (
            ["--optimizer", "fira_adamw", "--scale", "norm"],
            "not a rule of --optimizer fira_adamw (its rules: rms)",
        ),
        (
            ["--contrastive-batches", "distinct"],
            (
                "--contrastive-batches is an option of --objective contrastive,"
                " not of causal_lm"
            ),
        ),
        (
            ["--optimizer", "apollo_adamw", "--scaling-type", "row"],
            "unknown --scaling-type 'row'",
        ),
        (["--log-to", "tensorboard,mlflow"], "unknown --log-to 'mlflow'"),
    ],
)
def test_bad_input_stops_before_training(tmp_path, capsys, args, message):
  out = tmp_path / "bad"
  assert (
      main(
          ["gpt2", "--preset", "tiny", "--steps", "2", "--out", str(out), *args]
      )
      == 2
  )
  assert message in capsys.readouterr().err
  assert not (out / "metrics.jsonl").exists()


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path, capsys):
  out = str(tmp_path / "run")
  base = [*SMALL, "--out", out]
  assert main(base) == 0
  assert main([*base, "--resume", "--rank", "8"]) == 2
  assert (
      "from another config (rank: checkpoint 16 vs now 8)"
      in capsys.readouterr().err
  )
  assert main([*base[:-2], "--out", str(tmp_path / "empty"), "--resume"]) == 2
  assert "--resume: no checkpoint in" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "train",
          "vit",
          "--preset",
          "tiny",
          "--steps",
          "2",
          "--batch-size",
          "8",
          "--out",
          str(tmp_path / "cli"),
      ],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  assert "validation loss" in proc.stdout and "AdamW would hold" in proc.stdout


def test_runs_without_out_get_fresh_directories(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  runs = tmp_path / "runs"
  assert main(SMALL) == 0
  first = (runs / "gpt2" / "metrics.jsonl").read_text()
  # the same command again: a new directory, the first run untouched
  assert main(SMALL) == 0
  assert (runs / "gpt2-1" / "summary.json").exists()
  assert (runs / "gpt2" / "metrics.jsonl").read_text() == first
  config = json.loads((runs / "gpt2-1" / "config.json").read_text())
  assert config["out"] == "runs/gpt2-1"
  assert main([*SMALL, "--resume"]) == 2  # which run? it must be named
  assert "--resume needs --out" in capsys.readouterr().err


def test_an_out_that_holds_a_run_is_refused_unless_resumed_or_overwritten(
    tmp_path, capsys
):
  out = tmp_path / "run"
  args = [*SMALL, "--out", str(out)]
  assert main(args) == 0
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  assert main(args) == 2
  assert (
      f"--out {out} already holds a run; pass --resume to continue it,"
      " --overwrite"
      in capsys.readouterr().err
  )
  assert {
      p: p.read_bytes() for p in out.rglob("*") if p.is_file()
  } == before  # nothing lost
  assert main([*args, "--overwrite", "--steps", "3"]) == 0
  assert json.loads((out / "summary.json").read_text())["steps"] == 3
  assert main([*args, "--resume", "--overwrite"]) == 2
  assert "give one" in capsys.readouterr().err


def test_files_are_replaced_whole(tmp_path):
  from train.report import write_atomic

  path = tmp_path / "summary.json"
  write_atomic(path, "old")
  with pytest.raises(TypeError):
    # fails mid-write: the old file stays, no temporary is left
    write_atomic(path, None)
  assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [
      "summary.json"
  ]
  write_atomic(path, "new")
  assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def _damage(checkpoint: pathlib.Path) -> None:
  for f in (checkpoint / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00garbage" * 8)


def test_resume_skips_a_damaged_checkpoint(tmp_path, capsys):
  whole = train(
      _cfg(tmp_path, out=str(tmp_path / "whole"), steps=6), verbose=False
  )
  cfg = _cfg(tmp_path, out=str(tmp_path / "parts"), steps=6, checkpoint_every=2)
  train(cfg, stop_after=4, verbose=False)  # checkpoints at steps 2 and 4
  _damage(tmp_path / "parts" / "checkpoints" / "4")
  resumed = train(dataclasses.replace(cfg, resume=True), verbose=False)
  err_out = capsys.readouterr().out
  assert (
      "the checkpoint of step 4 is unreadable" in err_out
      and "resuming from step 2" in err_out
  )
  assert (
      tmp_path / "parts" / "damaged-checkpoints" / "4"
  ).is_dir()  # set aside, not deleted
  for a, b in zip(
      jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)
  ):
    # steps 3-6 redone exactly
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_with_no_intact_checkpoint_says_so(tmp_path, capsys):
  out = tmp_path / "run"
  assert main([*SMALL, "--steps", "4", "--out", str(out)]) == 0
  for step in ("2", "4"):
    _damage(out / "checkpoints" / step)
  assert main([*SMALL, "--steps", "4", "--out", str(out), "--resume"]) == 2
  err = capsys.readouterr().err
  assert (
      "no intact checkpoint in" in err
      and "step 4 unreadable" in err
      and "step 2 unreadable" in err
  )
  assert "Traceback" not in err


def test_a_diverging_run_ends_with_one_clear_line(tmp_path, capsys):
  out = tmp_path / "run"
  code = main([
      *SMALL,
      "--steps",
      "30",
      "--out",
      str(out),
      "--lr",
      "1e30",
      "--schedule",
      "constant",
      "--clip",
      "0",
      "--log-every",
      "1",
      "--optimizer",
      "sgd",
  ])
  err = capsys.readouterr().err
  assert code == 1
  assert re.fullmatch(
      r"error: the loss became (nan|inf) at step \d+; (the last checkpoint kept"
      r" is step \d+ in .*"
      r"|no checkpoint was kept)\n",
      err,
  ), err
  # the run's files are there
  assert json.loads((out / "config.json").read_text())["lr"] == 1e30


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--lr", "-1"),
        ("--scale", "nan"),
        ("--weight-decay", "inf"),
        ("--clip", "-1"),
    ],
)
def test_non_finite_hyperparameters_are_refused_up_front(
    tmp_path, capsys, flag, value
):
  assert main([*SMALL, "--out", str(tmp_path / "run"), flag, value]) == 2
  assert f"{flag} must be" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def test_refresh_steps_are_timed_where_bases_were_computed(tmp_path):
  # Lazy refresh at threshold 0 doubles the interval after each refresh: bases
  # at steps 0, 2, 6 (a fixed T=2 rule would time steps 2, 4, 6). Step 0
  # compiles, so 2 and 6 are timed.
  cfg = _cfg(
      tmp_path, steps=8, eval_every=8, lazy_threshold=0.0, lazy_patience=1
  )
  refresh = train(cfg, verbose=False).summary["refresh"]
  assert refresh["refresh_steps_timed"] == 2
  assert refresh["bases_computed"] == 3 * 8


def test_compare_table_of_runs_stopped_before_their_first_evaluation():
  stopped = dict(
      optimizer_state_bytes=2048,
      optimizer_state_vs_adamw=0.5,
      median_step_ms=3.0,
  )
  table = report.compare_table({"adamw": stopped, "galore_adamw": stopped})
  assert "| adamw | - | - | 2.00K | 50% | 3.0 |" in table


def test_config_file_runs_a_run_again_and_flags_override_it(tmp_path, capsys):
  first, again, other = (tmp_path / n for n in ("first", "again", "other"))
  assert main([*SMALL, "--scale", "0.5", "--out", str(first)]) == 0
  saved = str(first / "config.json")
  assert main(["--config", saved, "--out", str(again)]) == 0
  read = lambda run, name: json.loads((run / name).read_text())
  a, b = read(first, "config.json"), read(again, "config.json")
  assert {k for k in a if a[k] != b[k]} == {"out"}
  assert (
      read(first, "summary.json")["val_loss"]
      == read(again, "summary.json")["val_loss"]
  )
  # a flag overrides the file; the file's low-rank flags do not follow
  # another optimizer
  assert (
      main(["--config", saved, "--out", str(other), "--optimizer", "adamw"])
      == 0
  )
  c = read(other, "config.json")
  assert c["optimizer"] == "adamw" and c["rank"] is None and c["scale"] is None
  assert c["steps"] == a["steps"] and c["preset"] == "tiny"
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: gpt2\npreset: tiny\nlearning_rate: 0.1\n")
  capsys.readouterr()
  assert main(["--config", str(bad)]) == 2
  assert "'learning_rate' is not a field" in capsys.readouterr().err


def test_config_files_of_earlier_versions_and_booleans_from_files(tmp_path):
  old = tmp_path / "old.yaml"  # "task" was the model's field
  old.write_text("task: bert\nfinetune: stdlib:order\nlayerwise: true\n")
  args = parse(["--config", str(old)])
  assert (args["model"], args["finetune"], args["layerwise"]) == (
      "bert",
      "stdlib:order",
      True,
  )
  # the file's true boolean turned off by its --no- form
  args = parse(["--config", str(old), "--no-layerwise"])
  del args["compare"], args["stop_after"]
  cfg = config_lib.TrainConfig(**args)
  assert (cfg.objective, cfg.layerwise) == ("sequence_classification", False)
  assert config_lib.upgrade({"task": "vit"}) == {
      "model": "vit",
      "objective": "image_classification",
  }


def test_adamw8bit_keeps_the_embeddings_moments_in_float32(tmp_path):
  # bitsandbytes' StableEmbedding recipe by default; --quantize-embeddings
  # quantizes them as every other large leaf, as runs before the flag did
  import jax

  from benchmarks.quality import same_run
  from galore_optax import quantization
  from train import loop

  shapes = {
      "wte": {"embedding": jax.ShapeDtypeStruct((256, 64), "float32")},
      "blocks": {
          "0": {
              "mlp": {
                  "fc": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")}
              }
          }
      },
  }
  for quantize in (False, True):
    cfg = config_lib.TrainConfig(
        optimizer="adamw8bit", quantize_embeddings=quantize, out=str(tmp_path)
    )
    tx, _ = loop.build_optimizer(cfg, shapes)
    mu = jax.eval_shape(tx.init, shapes)[1][0].mu
    assert quantization.is_quantized(mu["blocks"]["0"]["mlp"]["fc"]["kernel"])
    assert quantization.is_quantized(mu["wte"]["embedding"]) == quantize
  # a ledger row of an earlier version is a run of --quantize-embeddings
  old = {"model": "gpt2", "optimizer": "adamw8bit", "lr": 2e-3}
  assert config_lib.upgrade(old)["quantize_embeddings"] is True
  assert same_run(
      old,
      config_lib.TrainConfig(
          optimizer="adamw8bit", lr=2e-3, quantize_embeddings=True
      ),
  )
  assert not same_run(
      old, config_lib.TrainConfig(optimizer="adamw8bit", lr=2e-3)
  )


def test_a_ledger_run_is_found_whatever_its_scratch_paths():
  # benchmarks.finetune fine-tunes an encoder it pretrains in the sitting's
  # scratch directory: the runs of another sitting are the same runs
  from benchmarks.quality import same_run

  cfg = config_lib.TrainConfig(
      model="bert", init="/tmp/b/pretrained", out="/tmp/b/run", lr=1e-4
  )
  saved = dataclasses.asdict(
      dataclasses.replace(cfg, init="runs/a/pretrained", out="runs/a/run")
  )
  assert not same_run(saved, cfg)
  assert same_run(saved, cfg, scratch=("out", "init"))
  assert not same_run(saved, dataclasses.replace(cfg, lr=2e-4), ("init",))


def _tensorboard_scalars(directory: pathlib.Path) -> dict:
  """(tag, step) -> value of the scalars in a TFRecord event file."""
  import struct

  from tensorboardX.proto import event_pb2

  (path,) = directory.glob("events.out.tfevents.*")
  data, at, scalars = path.read_bytes(), 0, {}
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at : at + 8])
    event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
    at += 12 + length + 4  # length, its CRC, the record, its CRC
    for value in event.summary.value:
      if value.HasField("simple_value"):
        scalars[value.tag, event.step] = value.simple_value
  return scalars


def test_log_to_sends_every_metrics_row_to_tensorboard_and_wandb(tmp_path):
  out = tmp_path / "run"
  argv = [*SMALL, "--eval-every", "2", "--log-every", "1", "--out", str(out)]
  assert main([*argv, "--log-to", "tensorboard,wandb"]) == 0
  rows = [
      json.loads(line)
      for line in (out / "metrics.jsonl").read_text().splitlines()
  ]
  scalars = _tensorboard_scalars(out / "tensorboard")
  expected = {
      (k, r["step"]): v for r in rows for k, v in r.items() if k != "step"
  }
  assert expected.keys() == scalars.keys() and "val_loss" in rows[-1]
  for key, value in expected.items():
    assert scalars[key] == pytest.approx(value, rel=1e-6), key
  # offline: the run's log holds each value as JSON (wandb sync uploads it)
  (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
  recorded = log.read_bytes()
  for row in rows:
    for key in ("loss", "val_loss"):
      if key in row:
        assert json.dumps(row[key]).encode() in recorded, (key, row["step"])


def test_progress_is_one_line_per_report_in_a_pipe_and_a_bar_on_a_terminal():
  class Terminal(io.StringIO):

    def isatty(self):
      return True

  for stream in (io.StringIO(), Terminal()):
    progress = loop.Progress(100, "tok", stream=stream)
    progress.show(10, 2.5, 1e-3, 5000.0, 90.0)
    progress.note("  eval val_loss 2.4000")
    progress.show(20, 2.25, 1e-3, 5000.0, 80.0)
    progress.close()
    text = stream.getvalue()
    if stream.isatty():  # redrawn in place; the note on a line of its own
      assert "\r[####................]    20/100  loss 2.2500" in text
      assert "\r[##................" in text
      assert "\r  eval val_loss 2.4000\n" in text
    else:
      assert text.splitlines() == [
          (
              "[##..................]    10/100  loss 2.5000  lr 1.00e-03  5.0k"
              " tok/s  ETA 1:30"
          ),
          "  eval val_loss 2.4000",
          (
              "[####................]    20/100  loss 2.2500  lr 1.00e-03  5.0k"
              " tok/s  ETA 1:20"
          ),
      ]


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(model="vit", vocab_size=300),
            (
                "--vocab-size is an option of --objective causal_lm, not of"
                " image_classification"
            ),
        ),
        (
            dict(model="bert", objective="causal_lm"),
            (
                "--objective causal_lm needs a model that offers next_token,"
                " which bert does not; bert trains on masked_lm,"
                " sequence_classification"
            ),
        ),
        (
            dict(model="gpt2", objective="ranking"),
            "unknown objective 'ranking'",
        ),
        (
            dict(vocab_size=300, init=str(pathlib.Path("no") / "such" / "run")),
            "with --init the checkpoint's is used",
        ),
        (
            dict(model="bert", layerwise=True),
            "--layerwise does not run bert: its blocks take a padding mask",
        ),
        (
            dict(model="clip", remat="block"),
            "--remat block does not run clip: its two towers",
        ),
        (
            dict(optimizer="adam", weight_decay=0.1),
            "adam takes no weight decay",
        ),
        (dict(resume=True), "--resume needs --out"),
    ],
)
def test_flag_checks_are_made_by_the_config_itself(fields, message):
  # before any data, model or file is touched
  with pytest.raises(ValueError, match=re.escape(message)):
    config_lib.TrainConfig(**fields)


def test_an_objective_is_one_module_and_each_model_has_its_own(
    tmp_path, monkeypatch
):
  from train import objectives

  assert {m: objectives.default_objective(m) for m in MODELS} == {
      "gpt2": "causal_lm",
      "vit": "image_classification",
      "bert": "masked_lm",
      "clip": "contrastive",
      "llama": "causal_lm",
  }
  assert objectives.objectives_of("bert") == [
      "masked_lm",
      "sequence_classification",
  ]
  # a module dropped into the package is found by its OBJECTIVE's name
  (tmp_path / "next_token_rank.py").write_text(
      "from train.objectives import causal_lm\n"
      "class Ranked(causal_lm.CausalLM):\n"
      "  name = 'next_token_rank'\n"
      "OBJECTIVE = Ranked()\n"
  )
  monkeypatch.setattr(
      objectives, "__path__", [*objectives.__path__, str(tmp_path)]
  )
  monkeypatch.delitem(
      sys.modules, "train.objectives.next_token_rank", raising=False
  )
  found = objectives._discover()
  assert set(found) == {*objectives.OBJECTIVES, "next_token_rank"}
  assert found["next_token_rank"].needs == "next_token"
  sys.modules.pop("train.objectives.next_token_rank", None)
