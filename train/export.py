"""``python -m train export RUN --out DIR``: a run's newest checkpoint as a
Hugging Face checkpoint (config.json, model.safetensors) that
``from_pretrained`` loads, with the run's tokenizer (tokenizer.json and a
tokenizer_config.json naming ``PreTrainedTokenizerFast``)."""

from __future__ import annotations

import json
import pathlib
import shutil

from models import hf
from train import init as init_lib
from train import tokenizer as tokenizer_lib
from train.config import upgrade


def export(run: str, out: str) -> str:
  """Writes run ``run``'s model (and tokenizer, where it has a file) to
  ``out``; returns what was written, for the user."""
  family, config, params = init_lib.trained_model(run)
  kind = hf.save(params, family, config, out)
  tokenizer = upgrade(init_lib.run_config(run)).get("tokenizer", "bytes")
  written = f"a {kind} checkpoint"
  if tokenizer == "bytes":
    return (
        written + " (token ids are the text's UTF-8 bytes: no tokenizer file)"
    )
  if tokenizer.startswith("bpe:"):
    shutil.copy(pathlib.Path(run) / tokenizer_lib.FILE, pathlib.Path(out))
  else:  # hf:NAME, as the run read it
    tokenizer_lib.load(tokenizer).backend.save(
        str(pathlib.Path(out) / tokenizer_lib.FILE)
    )
  (pathlib.Path(out) / "tokenizer_config.json").write_text(
      json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n"
  )
  return written + f" and its tokenizer ({tokenizer})"
