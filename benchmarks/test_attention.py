"""The preset grid of ``attnkern bench`` under pytest-benchmark: every case x every subject
that can run here (ATTNKERN_BENCH_PRESET=quick|standard|llm picks the grid; default quick)."""

import pytest

from bench_grid import case_id, preset_cases, runnable_subjects

SUBJECTS = runnable_subjects()
BASELINE = SUBJECTS[0] if SUBJECTS else None


@pytest.mark.parametrize("case", preset_cases(), ids=case_id)
@pytest.mark.parametrize("subject", SUBJECTS)
def test_attention(attention_benchmark, case, subject):
    attention_benchmark(case, subject, baseline=BASELINE)
