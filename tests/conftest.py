"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest

from tests.helpers import QUICK


@pytest.fixture
def quick() -> list[str]:
    return list(QUICK)
