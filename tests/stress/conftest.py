"""The stress tests' time budget: PMNC_STRESS_SECONDS (5 in CI's short pass, 60+ locally)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def stress_seconds() -> float:
    """How long each stress test drives its load; every wait beyond it has its own bound."""
    return float(os.environ.get("PMNC_STRESS_SECONDS", "5"))
