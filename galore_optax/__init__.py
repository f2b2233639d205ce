"""galore_optax: GaLore (Gradient Low-Rank Projection) as composable optax
transforms."""

from galore_optax.alias import adamw_8bit
from galore_optax.alias import apollo_adamw
from galore_optax.alias import apollo_mini
from galore_optax.alias import fira_adamw
from galore_optax.alias import galore_adafactor
from galore_optax.alias import galore_adam
from galore_optax.alias import galore_adamw
from galore_optax.alias import galore_lamb
from galore_optax.alias import galore_lion
from galore_optax.alias import galore_sgd
from galore_optax.apollo import ApolloState
from galore_optax.apollo import scale_by_apollo
from galore_optax.inner import add_decoupled_weight_decay
from galore_optax.inner import scale_by_bias_correction
from galore_optax.inner import scale_by_reference_adam
from galore_optax.memory import MemoryReport
from galore_optax.memory import memory_report
from galore_optax.moments import MOMENT_POLICIES
from galore_optax.projection import DEFAULT_PRECISION
from galore_optax.projection import PROJ_TYPES
from galore_optax.projection import MatrixAxes
from galore_optax.quantization import CODEBOOKS
from galore_optax.quantization import QuantizedArray
from galore_optax.quantization import dequantize
from galore_optax.quantization import quantize
from galore_optax.quantization import quantize_state
from galore_optax.rank import adaptive_ranks
from galore_optax.refresh import ORTHONORMALITY_TOL
from galore_optax.refresh import RefreshState
from galore_optax.step_size import SCALE_RULES
from galore_optax.steps import find_states
from galore_optax.subspace import SVD_METHODS
from galore_optax.subspace import LazyRefresh
from galore_optax.subspace import RandomizedSVD
from galore_optax.targets import DEFAULT_EXCLUDE
from galore_optax.targets import match_paths
from galore_optax.targets import plan_leaves
from galore_optax.transform import GaLoreProjector
from galore_optax.transform import GaLoreState
from galore_optax.transform import bases_computed
from galore_optax.transform import refresh_stats
from galore_optax.transform import scale_by_galore

# The one place the version is written: pyproject.toml and the docs read it.
__version__ = "0.1.0"

__all__ = [
    "adamw_8bit",
    "adaptive_ranks",
    "add_decoupled_weight_decay",
    "apollo_adamw",
    "apollo_mini",
    "ApolloState",
    "bases_computed",
    "CODEBOOKS",
    "DEFAULT_EXCLUDE",
    "DEFAULT_PRECISION",
    "dequantize",
    "find_states",
    "fira_adamw",
    "galore_adafactor",
    "galore_adam",
    "galore_adamw",
    "galore_lamb",
    "galore_lion",
    "galore_sgd",
    "GaLoreProjector",
    "GaLoreState",
    "LazyRefresh",
    "match_paths",
    "MatrixAxes",
    "memory_report",
    "MemoryReport",
    "MOMENT_POLICIES",
    "ORTHONORMALITY_TOL",
    "plan_leaves",
    "PROJ_TYPES",
    "quantize",
    "quantize_state",
    "QuantizedArray",
    "RandomizedSVD",
    "refresh_stats",
    "RefreshState",
    "scale_by_apollo",
    "scale_by_bias_correction",
    "scale_by_galore",
    "scale_by_reference_adam",
    "SCALE_RULES",
    "SVD_METHODS",
]
