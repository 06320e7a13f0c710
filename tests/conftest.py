"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest

from tests.helpers import QUICK


@pytest.fixture
def quick() -> list[str]:
    return list(QUICK)


# Tests whose cost is a full-width model on a CPU (the 12.4M-weight ResNet-12 at 84x84: ~100 s
# each on 2 cores). The README's test command skips them (pyproject's `-m "not slow"`); CI runs
# them afterwards (`python -m pytest -q -m slow`). Everything they check also runs, at narrow
# width, in the default suite (tests/test_backbones.py, resnet12_narrow).
SLOW = {
    "test_option_composes_and_builds[model=resnet12]",
    "test_every_task_model_pair_builds_or_says_why_not[miniimagenet-resnet12]",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.name in SLOW:
            item.add_marker(pytest.mark.slow)
