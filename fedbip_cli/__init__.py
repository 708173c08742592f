"""fedbip: personalized task-vector merging of LoRA adapters (after FedBip, arXiv 2509.12697)."""

import os

# The one place the version is written: pyproject.toml reads it (``[tool.setuptools.dynamic]``), and
# CHANGELOG.md's newest section names it (tests/test_docs.py checks both).
__version__ = "0.2.0"

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads made
# torch steps 10-20x slower whenever another process was busy. Only effective before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
