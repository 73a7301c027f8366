"""Type checking as part of the suite (mypy with django-stubs; strict in routing and billing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_money_and_routing_code_type_checks():
    """mypy (with django-stubs) on the hot path and the ledger; strict settings in pyproject."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "routing", "billing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-5000:]
