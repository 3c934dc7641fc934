"""veer side by side with kube-proxy: the pieces of bench/compare.py."""

import sys
from pathlib import Path

# The bench imports the e2e tests' control plane (tests/e2e/controlplane.py).
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
