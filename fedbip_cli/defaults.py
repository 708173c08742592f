"""Defaults, limits and named option values, in a module with no heavy imports.

The CLI builds its help text at import and checks named option values while parsing, before a
command imports torch; importing these from ``sketch``, ``shards`` or ``weights`` would load torch
first and make ``fedbip --help``, ``--version`` and a mistyped value take seconds. The modules that
use them import them from here (the combine and weighting registries are checked against their
names by the tests).
"""

DEFAULT_MAX_SHARD_SIZE = "2GB"  # full checkpoints: the largest output shard
DEFAULT_DIM = 96  # sketch dimension M: each module's ΔW is reduced to M x M numbers
MAX_DIM = 1024
# Softmax temperature bounds (--temperature and the config key): similarities lie in [-1, 1], so
# S/T stays finite and distinguishable.
MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e6
# --heads: what happens to saved modules (modules_to_save): merged (against zero where the base lacks
# them), kept as each client's own (left out of the similarity), or left out of the similarity and the outputs.
HEADS = ("merge", "own", "exclude")

# Named option values (the registries and value classes that use them import them from here).
GRANULARITIES = ("model", "block", "module")
WEIGHTING_NAMES = ("paper", "softmax")
NEGATIVE_MODES = ("clip", "keep")
COMBINE_NAMES = ("svd", "cat", "linear")
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
SIMILARITY_METHODS = ("exact", "sketch")
FORMATS = ("table", "json", "csv")
ENGINES = ("inprocess", "flower")
# fedbip evaluate: tokens per sentence (simulate's --max-length default, so that a simulation's adapters
# score as in its run), sentences per forward pass, and the paired bootstrap's resamples and confidence.
EVALUATE_MAX_LENGTH = 32
EVALUATE_BATCH_SIZE = 128
RESAMPLES = 2000
CONFIDENCE = 0.95
# simulate --select-on-validation (``simulate.selection``): the share of each client's training sentences
# it holds out, and the merge's shares λ it chooses among (0: its own trained model, 1: the merge).
VALIDATION_FRACTION = 0.25
SELECTION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
