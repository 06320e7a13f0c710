"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest

from tests.helpers import QUICK


@pytest.fixture
def quick() -> list[str]:
    return list(QUICK)


# Tests marked slow: those whose cost is a full-width model on a CPU (the 12.4M-weight ResNet-12
# at 84x84: ~100 s each on 2 cores; everything they check also runs, at narrow width, in the
# default suite: tests/test_backbones.py, resnet12_narrow), and the slowest end-to-end runs
# (30-70 s each here: two-process gloo runs, RL runs, the GPU check's dry run, full-size preset
# builds, the bench's quick mode, Optuna and submitit sweeps), so the default run stays near 15
# minutes on 2 cores. The README's test command skips them (pyproject's `-m "not slow"`); CI
# runs them afterwards (`python -m pytest -q -m slow`).
SLOW = {
    "test_option_composes_and_builds[model=resnet12]",
    "test_every_task_model_pair_builds_or_says_why_not[miniimagenet-resnet12]",
    "test_two_gloo_ranks_match_one_process_and_resume",
    "test_rl_bad_input_is_one_line",
    "test_dry_run_writes_the_bench_the_run_and_its_figures",
    "test_short_navigation_run_learns_to_adapt",
    "test_option_composes_and_builds[experiment=antoniou19_mamlpp_miniimagenet_5w5s]",
    "test_option_composes_and_builds[experiment=antoniou19_mamlpp_miniimagenet_5w1s]",
    "test_torchrun_all_reduces_the_learned_meta_parameters",
    "test_two_gloo_ranks_match_one_process",
    "test_rl_resume_is_exact_and_evaluate_reads_rl_runs",
    "test_rl_with_a_torch_optimizer_resumes_exactly",
    "test_quick_bench_of_metasgd_times_ours_and_learn2learn",
    "test_quick_bench_of_ours_prints_a_rate_for_every_workload",
    "test_optuna_search_reads_the_returned_objective",
    "test_submitit_local_runs_the_slurm_path_without_a_cluster",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.name in SLOW:
            item.add_marker(pytest.mark.slow)
