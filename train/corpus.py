"""Corpora larger than memory (``--memmap``): tokenized once into flat token
files beside the data, memory-mapped, and read a window at a time through
Grain.

``DATA.tokens/<tokenizer>/`` holds ``train.bin`` and ``val.bin`` (token ids,
uint16 or uint32), ``val_ends.npy`` (each validation token's end as a byte
offset, for bits per byte) and ``meta.json`` (the tokenizer's identity and
the source files' names, sizes and modification times). A cache whose stamp
no longer matches is rebuilt. As for in-memory text, the files are read in
sorted order, joined by newlines, and the last 5% of the bytes (at most
:data:`MAX_VAL_BYTES`) are the validation split.

Training windows come from a Grain ``MapDataset``: the train file cut into
windows of ``seq_len + 1`` tokens (overlapping by one), shuffled afresh each
epoch by ``--seed``; step ``s`` takes windows ``s * batch ... (s + 1) * batch
- 1``, so a batch is a function of (seed, step) and a resumed run reads what
an uninterrupted one would. A process reads only its own rows: only those
windows' pages are touched.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from typing import Iterator

import numpy as np

from train import data as data_lib
from train import tokenizer as tokenizer_lib

CHUNK_BYTES = 2**24  # text tokenized at a time
MAX_VAL_BYTES = 2**26
META = "meta.json"


def sources(spec: str) -> list[pathlib.Path]:
  """The files ``--memmap`` tokenizes for ``--data spec``, sorted.

  Raises:
    DataError: for data read in memory only, a missing path or no files.
  """
  path = pathlib.Path(spec)
  if spec.startswith("hf:") or spec == "stdlib":
    raise data_lib.DataError(
        f"--memmap reads local files; --data {spec} is read in memory (drop"
        " --memmap)"
    )
  if not path.exists():
    raise data_lib.DataError(f"data path {spec!r} does not exist")
  files = (
      sorted(p for p in path.rglob("*") if p.is_file() and not _is_cache(p))
      if path.is_dir()
      else [path]
  )
  if not files:
    raise data_lib.DataError(f"data path {spec!r} holds no files")
  return files


def _is_cache(path: pathlib.Path) -> bool:
  return any(part.endswith(".tokens") for part in path.parts)


def cache_dir(spec: str, tok: tokenizer_lib.Tokenizer) -> pathlib.Path:
  slug = re.sub(r"[^A-Za-z0-9_.@-]+", "_", tok.identity)
  return pathlib.Path(spec.rstrip("/") + ".tokens") / slug


def _stamp(files: list[pathlib.Path], tok) -> dict:
  return {
      "tokenizer": tok.identity,
      "sources": [
          [str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files
      ],
  }


def _byte_stream(files: list[pathlib.Path]) -> Iterator[bytes]:
  """The files joined by newlines, in pieces of at most CHUNK_BYTES."""
  for i, f in enumerate(files):
    if i:
      yield b"\n"
    with open(f, "rb") as stream:
      while piece := stream.read(CHUNK_BYTES):
        yield piece


def _pieces(files, split: int) -> Iterator[tuple[bool, bytes]]:
  """``(is_val, text)`` pieces of the joined files, cut at byte ``split`` and
  otherwise after a newline, so that no token straddles two pieces."""
  position, pending = 0, b""
  for block in _byte_stream(files):
    if position < split <= position + len(block):
      yield False, pending + block[: split - position]
      pending, block = b"", block[split - position :]
      position = split
    pending += block
    position += len(block)
    is_val = position - len(pending) >= split
    if len(pending) >= CHUNK_BYTES:
      # after the last newline (a line longer than 4 chunks is cut anyway)
      cut = pending.rfind(b"\n") + 1 or (
          CHUNK_BYTES if len(pending) >= 4 * CHUNK_BYTES else 0
      )
      if cut:
        yield is_val, pending[:cut]
        pending = pending[cut:]
  if pending:
    yield position - len(pending) >= split, pending


def build(spec: str, tok: tokenizer_lib.Tokenizer) -> pathlib.Path:
  """Tokenizes ``spec``'s files into :func:`cache_dir` unless a cache with the
  same stamp is there; returns the directory."""
  files = sources(spec)
  out = cache_dir(spec, tok)
  stamp = _stamp(files, tok)
  if (out / META).is_file():
    meta = json.loads((out / META).read_text())
    if {k: meta.get(k) for k in stamp} == stamp:
      return out
  total = sum(f.stat().st_size for f in files) + len(files) - 1
  val_bytes = min(max(int(total * data_lib.VAL_FRACTION), 1), MAX_VAL_BYTES)
  dtype = tokenizer_lib.token_dtype(tok.vocab_size)
  try:
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise data_lib.DataError(
        f"--memmap: cannot write the token files beside the data ({e})"
    ) from None
  counts, val_ends, val_offset = {"train": 0, "val": 0}, [], 0
  with (
      open(tmp / "train.bin", "wb") as train,
      open(tmp / "val.bin", "wb") as val,
  ):
    for is_val, text in _pieces(files, total - val_bytes):
      ids, ends = tokenizer_lib.encode(tok, text, dtype)
      (val if is_val else train).write(ids.tobytes())
      counts["val" if is_val else "train"] += len(ids)
      if is_val:
        val_ends.append(ends + val_offset)
        val_offset += len(text)
  if counts["val"] < 2 or counts["train"] < 2:
    shutil.rmtree(tmp)
    raise data_lib.DataError(
        f"data path {spec!r} is too small to split into training and"
        " validation tokens"
    )
  np.save(tmp / "val_ends.npy", np.concatenate(val_ends))
  meta = dict(
      stamp,
      dtype=np.dtype(dtype).name,
      vocab_size=tok.vocab_size,
      train_tokens=counts["train"],
      val_tokens=counts["val"],
      text_bytes=total,
  )
  (tmp / META).write_text(json.dumps(meta, indent=1))
  if out.exists():  # a stale cache, or another process's finished one
    shutil.rmtree(out, ignore_errors=True)
  try:
    tmp.rename(out)
  except OSError:  # another process renamed its identical copy first
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def open_tokens(spec: str, tok: tokenizer_lib.Tokenizer) -> data_lib.TextData:
  """``spec``'s token files (built first if needed), memory-mapped."""
  out = build(spec, tok)
  meta = json.loads((out / META).read_text())
  mapped = {
      split: np.memmap(
          out / f"{split}.bin",
          dtype=meta["dtype"],
          mode="r",
          shape=(meta[f"{split}_tokens"],),
      )
      for split in ("train", "val")
  }
  return data_lib.TextData(
      mapped["train"],
      mapped["val"],
      f"{spec} ({meta['text_bytes']:,} bytes as {tok.spec} tokens,"
      f" memory-mapped from {out})",
      tok.vocab_size,
      np.load(out / "val_ends.npy", mmap_mode="r"),
      tok.identity,
      memmapped=True,
  )


class Windows:
  """Random access to the windows of ``seq_len + 1`` tokens that cut
  ``tokens`` at every ``seq_len``-th token."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens, self.seq_len = tokens, seq_len

  def __len__(self) -> int:
    return (len(self.tokens) - 1) // self.seq_len

  def __getitem__(self, index: int) -> np.ndarray:
    start = index * self.seq_len
    return np.asarray(self.tokens[start : start + self.seq_len + 1])


def window_batch(
    tokens: np.ndarray,
    step: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    rows=slice(None),
):
  """Rows ``rows`` (a slice or indices) of step ``step``'s batch: (inputs,
  targets), each (rows, seq_len) int32."""
  import grain  # here: importing it takes seconds, and only --memmap needs it

  windows = Windows(tokens, seq_len)
  if len(windows) < 1:
    raise data_lib.DataError(
        f"{len(tokens)} tokens cannot fill a window of {seq_len + 1}"
    )
  dataset = grain.MapDataset.source(windows).shuffle(seed=seed).repeat()
  first = step * batch_size
  picked = np.stack(
      [dataset[first + int(r)] for r in np.arange(batch_size)[rows]]
  ).astype(np.int32)
  return picked[:, :-1], picked[:, 1:]
