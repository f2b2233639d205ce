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

__version__ = "0.1.0"
