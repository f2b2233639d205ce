"""``python -m train sample RUN --prompt TEXT``: what a causal language model
run learnt, as text it continues (greedy, or sampled at a temperature with
top-p)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import hf
from models.registry import MODELS
from train import init as init_lib
from train import tokenizer as tokenizer_lib
from train.config import upgrade


def pick(
    logits: np.ndarray,
    temperature: float,
    top_p: float,
    rng: np.random.Generator,
) -> int:
  """The next token from ``logits`` (vocab,): the most likely at temperature
  0; else drawn from softmax(logits / temperature) restricted to the most
  likely tokens whose probabilities first sum to ``top_p``."""
  if temperature == 0:
    return int(np.argmax(logits))
  z = logits.astype(np.float64) / temperature
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")
  kept = np.cumsum(probs[order]) - probs[order] < top_p  # the first always
  chosen = order[kept]
  return int(rng.choice(chosen, p=probs[chosen] / probs[chosen].sum()))


def generate(
    model: nnx.Module,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[int]:
  """``prompt`` continued by ``max_new_tokens`` tokens of ``model`` (token ids
  (batch, length) -> logits), each predicted from at most the model's
  ``max_len`` tokens before it. One compiled forward pass of a fixed window
  per token, without a cache: for looking at small models, not for serving."""
  window = min(model.config.max_len, len(prompt) + max_new_tokens)
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits_at(state, tokens, position):
    return nnx.merge(graphdef, state)(tokens[None])[0, position]

  rng = np.random.default_rng(seed)
  tokens = list(prompt)
  for _ in range(max_new_tokens):
    seen = tokens[-window:]
    padded = np.zeros(window, np.int32)  # later positions do not matter
    padded[: len(seen)] = seen
    logits = logits_at(state, jnp.asarray(padded), len(seen) - 1)
    tokens.append(pick(np.asarray(logits), temperature, top_p, rng))
  return tokens[len(prompt) :]


def sample(
    run: str,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
  """The text run ``run``'s model writes after ``prompt``."""
  if max_new_tokens <= 0:
    raise ValueError(f"--max-new-tokens must be positive, got {max_new_tokens}")
  if not temperature >= 0:
    raise ValueError(f"--temperature must be >= 0, got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
  family, config, params = init_lib.trained_model(run)
  if "next_token" not in MODELS[family].capabilities:
    raise hf.CheckpointMismatch(
        f"{run} is a {family} run; sample continues text with causal language"
        " models"
    )
  model = MODELS[family].model(config, rngs=nnx.Rngs(0))
  hf.set_params(model, params)
  spec = upgrade(init_lib.run_config(run)).get("tokenizer", "bytes")
  tok = tokenizer_lib.load(spec, run_dir=run)
  ids, _ = tokenizer_lib.encode(tok, prompt.encode())
  if not len(ids):
    raise ValueError("--prompt is empty")
  new = generate(model, ids.tolist(), max_new_tokens, temperature, top_p, seed)
  if tok.backend is None:  # bytes (a larger --vocab-size's other ids unused)
    return bytes(i for i in new if i < 256).decode("utf-8", "replace")
  return tok.backend.decode(new)
