"""Running the train step on many devices: a data/FSDP mesh, ``pmap``, and many
processes.

``--mesh data=D,fsdp=F`` (default: ``data=<all devices>``) builds a
``jax.make_mesh`` whose axes are explicit (``--mesh-axes explicit``, the
default) or left to XLA (``auto``):

- the batch is split over both axes; each process builds only the rows of its
  own devices (whatever their order in the mesh);
- every parameter is split over ``fsdp`` along its largest axis that ``F``
  divides (replicated when none does); gradients follow their parameters;
- the optimizer state is placed by :mod:`galore_optax.sharding`'s rules
  (GaLore's bases and moments follow their parameter's rows and columns; Adam's
  moments are parameter-shaped), read off the state's types under an explicit
  twin of the mesh so both axis types agree;
- for the forward pass the parameters are gathered whole (``reshard`` to
  replicated; its transpose reduce-scatters the gradients back), so models need
  no sharding annotations beyond their batch axis; the vocabulary tables
  (:data:`models.transformer.VOCABULARY_TABLES`) are not:
  :func:`models.transformer.embed` and :func:`~models.transformer.logits`
  compute with them split, so a large vocabulary's table and its gradient are
  never whole on a device.

``--parallel pmap`` is the classic data-parallel path: parameters and state
replicated with a leading device axis, ``jax.pmap`` over the local devices,
gradients averaged by ``lax.pmean``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from typing import Callable
from typing import Optional

import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from galore_optax import sharding as sharding_lib
from galore_optax.targets import path_str
from models import transformer

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch is split over every device
PMAP_AXIS = "data"


class ParallelError(ValueError):
  """The devices, processes or mesh cannot run the run as configured; the
  message says why."""


def initialize_processes(
    coordinator: Optional[str],
    num_processes: Optional[int],
    process_id: Optional[int],
    auto: bool,
) -> None:
  """``jax.distributed.initialize`` from the flags, or with its own cluster
  detection (``auto``).

  On CPU the cross-process collectives go through gloo.
  """
  explicit = (coordinator, num_processes, process_id)
  if not auto and all(x is None for x in explicit):
    return
  if not auto and any(x is None for x in explicit):
    raise ParallelError(
        "--coordinator, --num-processes and --process-id go together (or use"
        " --distributed to let jax.distributed.initialize detect the cluster)"
    )
  if jax.distributed.is_initialized():  # e.g. the second run of --compare
    return
  # used only where devices are CPUs
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = (
      {}
      if auto
      else dict(
          coordinator_address=coordinator,
          num_processes=num_processes,
          process_id=process_id,
      )
  )
  jax.distributed.initialize(**kwargs)


def parse_mesh(text: Optional[str], n_devices: int) -> dict[str, int]:
  """``"data=2,fsdp=2"`` -> ``{"data": 2, "fsdp": 2}``; missing axes are 1; the
  product must use every device."""
  sizes = {name: 1 for name in MESH_AXES}
  if not text:
    sizes["data"] = n_devices
    return sizes
  for part in text.split(","):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in sizes or not value.strip().isdigit() or int(value) <= 0:
      raise ParallelError(
          f"--mesh {text!r}: expected NAME=SIZE pairs with NAME in {MESH_AXES}"
          f" and SIZE a positive integer, got {part!r}"
      )
    sizes[name] = int(value)
  if math.prod(sizes.values()) != n_devices:
    raise ParallelError(
        f"--mesh {text!r} has {math.prod(sizes.values())} devices but the run"
        f" has {n_devices} ({jax.process_count()} process(es)); the sizes must"
        f" multiply to {n_devices}"
    )
  return sizes


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """FSDP: split the largest axis that ``fsdp`` divides (the first such on
  ties), else replicate."""
  if fsdp > 1:
    for axis in sorted(range(len(shape)), key=lambda a: (-shape[a], a)):
      if shape[axis] % fsdp == 0:
        return P(*(("fsdp" if a == axis else None) for a in range(len(shape))))
  return P()


def bytes_per_device(tree: Any) -> int:
  """Bytes of ``tree``'s arrays held by one device (the largest share, for
  uneven splits)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = (
        x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") else x.shape
    )
    total += math.prod(shard) * x.dtype.itemsize
  return total


def compiled_memory(compiled) -> dict:
  """XLA's memory analysis of a compiled step, in bytes (what this backend
  reports)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  names = (
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "alias_size_in_bytes",
      "temp_size_in_bytes",
      "generated_code_size_in_bytes",
      "peak_memory_in_bytes",
  )
  out = {
      n.replace("_in_bytes", "_bytes"): int(getattr(stats, n))
      for n in names
      if hasattr(stats, n)
  }
  if all(k in out for k in FOOTPRINT):
    out["footprint_bytes"] = footprint(out)
  return out


FOOTPRINT = (
    "argument_size_bytes",
    "output_size_bytes",
    "alias_size_bytes",
    "temp_size_bytes",
)


def footprint(stats: dict) -> int:
  """What a compiled step holds at once: arguments + temporaries + outputs, less
  the outputs that reuse a donated argument's buffer."""
  argument, output, alias, temp = (stats[k] for k in FOOTPRINT)
  return argument + temp + output - alias


def rows_of_this_process(
    sharding: NamedSharding, batch_size: int
) -> np.ndarray:
  """The rows of a global batch that this process's devices hold, sorted.

  Built from each addressable device's own index range, so it is right on any
  mesh, including those whose device order interleaves processes.
  """
  index_map = sharding.addressable_devices_indices_map((batch_size,))
  every_row = np.arange(batch_size)
  return np.unique(
      np.concatenate([every_row[index[0]] for index in index_map.values()])
  )


def limit_blas_threads() -> bool:
  """One BLAS thread per process when JAX runs several CPU devices in it.

  XLA's CPU devices each run their own LAPACK calls (the refresh SVDs) at once;
  with OpenBLAS's default of one thread per core each, they oversubscribe the
  cores (20x slower on 4 simulated devices over 2 cores). Returns whether it
  acted.
  """
  if jax.local_device_count() < 2 or jax.local_devices()[0].platform != "cpu":
    return False
  # jaxlib's CPU LAPACK is SciPy's, whose OpenBLAS loads on first use; load it
  # now, since threadpoolctl can only limit libraries already loaded.
  import scipy.linalg  # noqa: F401
  import threadpoolctl  # both come with scikit-learn

  threadpoolctl.threadpool_limits(1, user_api="blas")
  return True


@dataclasses.dataclass
class MeshPlacement:
  """Where every array of a run lives on a ``jax.make_mesh`` mesh; see the
  module docstring."""

  mesh: jax.sharding.Mesh

  @classmethod
  def create(cls, mesh_text: Optional[str], axis_types: str) -> "MeshPlacement":
    sizes = parse_mesh(mesh_text, jax.device_count())
    kind = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[axis_types]
    return cls(
        jax.make_mesh(
            tuple(sizes.values()), tuple(sizes), axis_types=(kind,) * len(sizes)
        )
    )

  @property
  def size(self) -> int:
    return self.mesh.size

  def describe(self) -> str:
    axes = " x ".join(
        f"{name}={size}" for name, size in self.mesh.shape.items()
    )
    kind = "explicit" if AxisType.Explicit in self.mesh.axis_types else "auto"
    return f"mesh {axes} ({kind} axes) over {jax.process_count()} process(es)"

  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(BATCH_AXES))

  def local_rows(self, batch_size: int) -> np.ndarray:
    """The rows of a global batch that this process's devices hold (sorted
    indices)."""
    if batch_size % self.size:
      raise ParallelError(
          f"--batch-size {batch_size} is not divisible by the {self.size}"
          " devices of the mesh"
      )
    return rows_of_this_process(self.batch_sharding(), batch_size)

  def put_batch(self, local: Any, batch_size: int) -> Any:
    """A global batch from this process's rows (arrays whose rows are
    ``local_rows(...)``)."""
    sharding = self.batch_sharding()
    rows = self.local_rows(batch_size)

    def build(x):
      x = np.asarray(x)
      # a device's global rows, found among this process's rows
      own = lambda index: np.searchsorted(rows, np.arange(batch_size)[index[0]])
      shape = (batch_size,) + x.shape[1:]
      return jax.make_array_from_callback(shape, sharding, lambda i: x[own(i)])

    return jax.tree.map(build, local)

  def param_shardings(self, params: Any) -> Any:
    fsdp = self.mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(self.mesh, param_spec(x.shape, fsdp)), params
    )

  def put_params(self, params: Any) -> Any:
    return jax.device_put(params, self.param_shardings(params))

  def state_shardings(self, init: Callable, params: Any) -> Any:
    """The shardings ``init(params)`` takes by galore_optax's rules, whatever
    the axis types."""
    twin = jax.make_mesh(
        tuple(self.mesh.shape.values()),
        self.mesh.axis_names,
        axis_types=(AxisType.Explicit,) * len(self.mesh.axis_names),
    )
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(twin, s.spec)
        ),
        params,
        self.param_shardings(params),
    )
    with jax.set_mesh(twin):
      shapes = jax.eval_shape(init, abstract)
    # Leaves born outside any sharding rule (e.g. optax's step counters) have
    # none: replicate them.
    return jax.tree.map(
        lambda s: NamedSharding(
            self.mesh, s.sharding.spec if s.sharding else P()
        ),
        shapes,
    )

  def abstract(self, params: Any, init: Callable) -> tuple[Any, Any]:
    """``params`` and ``init(params)`` as sharded ``jax.ShapeDtypeStruct`` s:
    what a step compiles for, with nothing allocated."""
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    params = jax.tree.map(sds, params, self.param_shardings(params))
    with jax.set_mesh(self.mesh):
      shapes = jax.eval_shape(init, params)
    return params, jax.tree.map(sds, shapes, self.state_shardings(init, params))

  def init_state(self, init: Callable, params: Any) -> Any:
    with jax.set_mesh(self.mesh):
      return jax.jit(init, out_shardings=self.state_shardings(init, params))(
          params
      )

  def gather_for_compute(self, params: Any) -> Any:
    """The parameters whole on every device, for the forward pass (explicit
    axes; XLA decides under auto), but for the vocabulary tables: the models
    compute with those where they lie."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x
            if transformer.is_vocabulary_table(path_str(path))
            else sharding_lib.replicate(x)
        ),
        params,
    )

  def compile_step(
      self, step: Callable, params: Any, opt_state: Any, batch: Any
  ):
    """``step`` jitted over the mesh with donated params and state, compiled for
    these arguments.

    Returns the compiled step and XLA's memory analysis of it.
    """
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    state_sh = jax.tree.map(lambda x: x.sharding, opt_state)
    replicated = NamedSharding(self.mesh, P())
    jitted = jax.jit(
        step,
        in_shardings=(param_sh, state_sh, self.batch_sharding()),
        out_shardings=(param_sh, state_sh, replicated),
        donate_argnums=(0, 1),
    )
    with jax.set_mesh(self.mesh):
      compiled = jitted.lower(params, opt_state, batch).compile()
    return compiled, compiled_memory(compiled)

  def jit_eval(self, eval_step: Callable) -> Callable:
    jitted = jax.jit(eval_step)

    def run(params, batch):
      with jax.set_mesh(self.mesh):
        return jitted(params, batch)

    return run

  def to_checkpoint(self, tree: Any) -> Any:
    return tree  # orbax saves and restores sharded arrays as they are

  def from_checkpoint(self, tree: Any) -> Any:
    return tree


@dataclasses.dataclass
class PmapPlacement:
  """``jax.pmap`` data parallelism over this process's devices (``--parallel
  pmap``)."""

  n: int

  @classmethod
  def create(cls, mesh_text: Optional[str]) -> "PmapPlacement":
    if jax.process_count() > 1:
      raise ParallelError(
          "--parallel pmap runs in one process; use the mesh (the default)"
          " across processes"
      )
    sizes = parse_mesh(mesh_text, jax.local_device_count())
    if sizes["fsdp"] != 1:
      raise ParallelError(
          "--parallel pmap is data parallel only; drop fsdp from --mesh"
          f" {mesh_text!r}"
      )
    return cls(jax.local_device_count())

  @property
  def size(self) -> int:
    return self.n

  def describe(self) -> str:
    return f"pmap over {self.n} devices"

  def local_rows(self, batch_size: int) -> np.ndarray:
    if batch_size % self.n:
      raise ParallelError(
          f"--batch-size {batch_size} is not divisible by the {self.n} devices"
          " of pmap"
      )
    return np.arange(batch_size)

  def put_batch(self, local: Any, batch_size: int) -> Any:
    return jax.tree.map(
        lambda x: np.asarray(x).reshape((self.n, -1) + x.shape[1:]), local
    )

  def put_params(self, params: Any) -> Any:
    return self.from_checkpoint(params)

  def init_state(self, init: Callable, params: Any) -> Any:
    return jax.pmap(init)(params)

  def gather_for_compute(self, params: Any) -> Any:
    return params

  def compile_step(
      self, step: Callable, params: Any, opt_state: Any, batch: Any
  ):
    def averaged(params, opt_state, batch):
      return step(
          params,
          opt_state,
          batch,
          grad_reduce=lambda g: jax.lax.pmean(g, PMAP_AXIS),
      )

    compiled = (
        jax.pmap(averaged, axis_name=PMAP_AXIS, donate_argnums=(0, 1))
        .lower(params, opt_state, batch)
        .compile()
    )

    def run(params, opt_state, batch):
      params, opt_state, metrics = compiled(params, opt_state, batch)
      return params, opt_state, jax.tree.map(lambda x: x[0], metrics)

    return run, compiled_memory(compiled)

  def jit_eval(self, eval_step: Callable) -> Callable:
    pmapped = jax.pmap(
        lambda p, b: jax.lax.pmean(eval_step(p, b), PMAP_AXIS),
        axis_name=PMAP_AXIS,
    )
    return lambda params, batch: jax.tree.map(
        lambda x: x[0], pmapped(params, batch)
    )

  def to_checkpoint(self, tree: Any) -> Any:
    """One copy of a replicated tree: what is saved."""
    return jax.tree.map(lambda x: x[0], tree)

  def from_checkpoint(self, tree: Any) -> Any:
    """A tree copied onto every local device, with the leading device axis pmap
    expects."""
    stacked = jax.tree.map(
        lambda x: np.broadcast_to(np.asarray(x), (self.n,) + x.shape), tree
    )
    return jax.pmap(lambda t: t)(stacked)
