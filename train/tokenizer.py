"""Tokenizers for the text objectives (``--tokenizer``): raw bytes, a
byte-level BPE trained here with Hugging Face ``tokenizers``, or a pretrained
tokenizer.

- ``bytes``: each byte is a token (vocabulary 256), the offline default;
- ``bpe:N``: a byte-level BPE of vocabulary N (256 byte tokens, merges, and
  ``<|endoftext|>``), trained on the run's training text and kept in the run
  directory as ``tokenizer.json``, which a resumed run reads back;
- ``hf:NAME``: a pretrained tokenizer: a local directory (its
  ``tokenizer.json``, or whatever ``transformers`` reads there), or a Hub name
  fetched by ``tokenizers`` only when asked.

Text is decoded as UTF-8 (invalid bytes replaced) before a tokenizer other
than ``bytes`` reads it. :func:`encode` gives each token's end as a byte
offset into the text, so that losses convert to bits per byte whatever the
tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any
from typing import Callable
from typing import Optional
from typing import Sequence
from typing import Union

import numpy as np

EOT = "<|endoftext|>"
FILE = "tokenizer.json"  # in the run directory, for bpe:N


class TokenizerError(ValueError):
  """The tokenizer cannot be built or does not fit; the message says why."""


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  spec: str  # as given: bytes, bpe:N, hf:NAME
  vocab_size: int
  eot: Optional[int]  # the end-of-text id, if the vocabulary has one
  backend: Any = None  # a tokenizers.Tokenizer, None for bytes

  @property
  def identity(self) -> str:
    """Names the vocabulary and its merges: two tokenizers with one identity
    give the same tokens (what a token file is stamped with)."""
    if self.backend is None:
      return "bytes"
    digest = hashlib.sha256(self.backend.to_str().encode()).hexdigest()
    return f"{self.spec}@{digest[:16]}"

  def token_id(self, token: str) -> Optional[int]:
    return None if self.backend is None else self.backend.token_to_id(token)


def _backend():
  try:
    import tokenizers
  except ImportError:
    raise TokenizerError(
        "--tokenizer bpe:N and hf:NAME need Hugging Face tokenizers: pip"
        " install tokenizers"
    ) from None
  return tokenizers


def train_bpe(
    text: bytes, vocab_size: int, specials: Sequence[str] = ()
) -> Any:
  """A byte-level BPE of ``vocab_size`` tokens (:data:`EOT` and ``specials``
  among them) learnt from ``text``; the same text gives the same merges."""
  tk = _backend()
  alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
  if vocab_size <= len(alphabet) + 1:
    raise TokenizerError(
        f"--tokenizer bpe:{vocab_size}: the vocabulary must exceed the"
        f" {len(alphabet)} byte tokens and {EOT}"
    )
  backend = tk.Tokenizer(tk.models.BPE())
  backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(
      vocab_size=vocab_size,
      initial_alphabet=alphabet,
      special_tokens=[EOT, *specials],
      show_progress=False,
  )
  backend.train_from_iterator(
      _lines(text.decode("utf-8", "replace")), trainer=trainer
  )
  return backend


def _lines(text: str, size: int = 2**16):
  """The text in pieces of about ``size`` characters, cut after newlines."""
  start = 0
  while start < len(text):
    end = text.find("\n", start + size)
    end = len(text) if end < 0 else end + 1
    yield text[start:end]
    start = end


def _pretrained(name: str) -> Any:
  tk = _backend()
  path = pathlib.Path(name)
  if (path / FILE).is_file():
    return tk.Tokenizer.from_file(str(path / FILE))
  if path.is_dir():
    try:
      from transformers import AutoTokenizer
    except ImportError:
      raise TokenizerError(
          f"--tokenizer hf:{name}: no {FILE} there, and reading other formats"
          " needs transformers"
      ) from None
    try:
      return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
    except Exception as e:  # a directory transformers cannot read: say why
      raise TokenizerError(
          f"--tokenizer hf:{name}: no tokenizer there ({type(e).__name__}: {e})"
      ) from None
  try:
    return tk.Tokenizer.from_pretrained(name)
  except Exception as e:  # unreachable Hub, unknown name: say which and why
    raise TokenizerError(
        f"--tokenizer hf:{name}: not a local directory, and the Hub gave"
        f" {type(e).__name__}: {e}"
    ) from None


def _eot(backend) -> Optional[int]:
  for token in (EOT, "</s>", "[SEP]"):
    if backend.token_to_id(token) is not None:
      return backend.token_to_id(token)
  return None


def load(
    spec: str,
    text: Union[bytes, Callable[[], bytes]] = b"",
    run_dir: Optional[str] = None,
    specials: Sequence[str] = (),
) -> Tokenizer:
  """The tokenizer ``spec`` names. ``bpe:N`` reads ``run_dir/tokenizer.json``
  when it exists there with N tokens (a resumed run), else trains on
  ``text`` (with the special tokens ``specials``; a callable is read only
  then) and writes it there."""
  if spec == "bytes":
    return Tokenizer(spec, 256, None)
  if spec.startswith("bpe:"):
    try:
      size = int(spec[4:])
    except ValueError:
      raise TokenizerError(
          f"--tokenizer {spec}: expected bpe:N, N the vocabulary size"
      ) from None
    saved = pathlib.Path(run_dir) / FILE if run_dir else None
    backend = None
    if saved is not None and saved.is_file():
      backend = _backend().Tokenizer.from_file(str(saved))
      if backend.get_vocab_size() != size or any(
          backend.token_to_id(t) is None for t in specials
      ):
        backend = None  # another run's tokenizer: train this one's
    if backend is None:
      backend = train_bpe(text() if callable(text) else text, size, specials)
      if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".tmp")
        backend.save(str(tmp))
        tmp.replace(saved)
    return Tokenizer(spec, backend.get_vocab_size(), _eot(backend), backend)
  if spec.startswith("hf:"):
    backend = _pretrained(spec[3:])
    return Tokenizer(spec, backend.get_vocab_size(), _eot(backend), backend)
  raise TokenizerError(
      f"--tokenizer {spec!r}: expected bytes, bpe:N or hf:NAME"
  )


def _byte_lengths(text: str) -> np.ndarray:
  """UTF-8 length of each character of ``text``."""
  points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
  return 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)


def encode(
    tok: Tokenizer, data: bytes, dtype=np.int32
) -> tuple[np.ndarray, np.ndarray]:
  """``(ids, ends)``: the tokens of ``data`` and each one's end as a byte
  offset into ``data`` (for ``bytes``: 1, 2, 3, ...)."""
  if tok.backend is None:
    ids = np.frombuffer(data, np.uint8).astype(dtype)
    return ids, np.arange(1, len(ids) + 1, dtype=np.int64)
  text = data.decode("utf-8", "replace")
  char_ends = np.concatenate([[0], np.cumsum(_byte_lengths(text))])
  ids, ends = [], []
  offset = 0
  pieces = list(_lines(text))
  for piece, enc in zip(
      pieces, tok.backend.encode_batch(pieces, add_special_tokens=False)
  ):
    ids.append(np.asarray(enc.ids, dtype))
    stops = np.asarray([e for _, e in enc.offsets], np.int64).reshape(-1)
    ends.append(char_ends[offset + stops])
    offset += len(piece)
  if not ids:
    return np.zeros(0, dtype), np.zeros(0, np.int64)
  return np.concatenate(ids), np.concatenate(ends)


def token_dtype(vocab_size: int):
  """The smallest unsigned type that holds every id."""
  return np.uint16 if vocab_size <= 2**16 else np.uint32


def check_vocabulary(
    spec: str, vocab_size: int, model_vocab: int, source: str
) -> None:
  """``--init``'s weights embed ``model_vocab`` ids: the tokenizer ``spec``,
  whose ids number ``vocab_size``, must be theirs (the same size)."""
  if vocab_size != model_vocab:
    hint = (
        " (pass --tokenizer hf:NAME with the checkpoint's tokenizer)"
        if spec == "bytes"
        else ""
    )
    raise TokenizerError(
        f"--init {source} embeds {model_vocab} token ids; --tokenizer"
        f" {spec} gives {vocab_size}{hint}"
    )


def caption_tokens(
    tok: Tokenizer, captions: list[str], length: int
) -> tuple[np.ndarray, int]:
  """``(tokens (len(captions), length) int32, eot)``: each caption's tokens,
  cut to leave room for, and ended by, the end-of-text id ``eot`` (for
  ``bytes``: 256, one past the bytes), padded with it."""
  eot = tok.vocab_size if tok.eot is None else tok.eot
  out = np.full((len(captions), length), eot, np.int32)
  if tok.backend is None:
    encoded = [list(c.encode("utf-8")) for c in captions]
  else:
    encoded = [e.ids for e in tok.backend.encode_batch(list(captions))]
  for row, ids in zip(out, encoded):
    ids = list(ids)
    if eot in ids:  # the tokenizer ends captions itself (CLIP's)
      ids = ids[: ids.index(eot)]
    ids = ids[: length - 1] + [eot]
    row[: len(ids)] = ids
  return out, eot
