"""Shared fixtures; tests import the small graph builders of graphs.py directly."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
