"""fedbip: personalized task-vector merging of LoRA adapters (after FedBip, arXiv 2509.12697)."""

import os
from importlib.metadata import PackageNotFoundError, version

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads made
# torch steps 10-20x slower whenever another process was busy. Only effective before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = version("fedbip")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
