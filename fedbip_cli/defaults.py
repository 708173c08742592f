"""Defaults and limits that ``fedbip --help`` shows, in a module with no heavy imports.

The CLI builds its help text at import; importing these from ``sketch`` or ``shards`` would load
torch first and make ``fedbip --help`` and ``fedbip --version`` take seconds. Their old homes
import them from here.
"""

DEFAULT_MAX_SHARD_SIZE = "2GB"  # full checkpoints: the largest output shard
DEFAULT_DIM = 96  # sketch dimension M: each module's ΔW is reduced to M x M numbers
MAX_DIM = 1024
# Softmax temperature bounds (--temperature and the config key): similarities lie in [-1, 1], so
# S/T stays finite and distinguishable.
MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e6
# fedbip evaluate: tokens per sentence (simulate's --max-length default, so that a simulation's adapters
# score as in its run), sentences per forward pass, and the paired bootstrap's resamples and confidence.
EVALUATE_MAX_LENGTH = 32
EVALUATE_BATCH_SIZE = 128
RESAMPLES = 2000
CONFIDENCE = 0.95
