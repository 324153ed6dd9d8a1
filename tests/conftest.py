"""Shared pytest setup: repo root on sys.path, and the session-wide pools of gloo ranks (tests/dist_pool.py)."""

from __future__ import annotations

import os
import sys

import pytest

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.dist_pool import close_all_pools, get_pool  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _close_rank_pools_at_session_end():
    yield
    close_all_pools()


@pytest.fixture
def rank_pool():
    """``get_pool``: call ``rank_pool(2)`` / ``rank_pool(4)`` for the session's live pool of that world size."""
    return get_pool
