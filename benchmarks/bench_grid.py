"""The grid the benchmark files parametrize over: the cases of ``attnkern bench --<preset>``
(ATTNKERN_BENCH_PRESET=quick|standard|llm, default quick) and the subjects that run here."""

from __future__ import annotations

import os

import torch

from attnkern.bench import cases as bench_cases
from attnkern.bench.cases import Case
from attnkern.bench.subjects import all_subjects, default_baseline

PRESET = os.environ.get("ATTNKERN_BENCH_PRESET", "quick")


def device() -> str:
    """"cuda" when available, else "cpu"; ATTNKERN_BENCH_DEVICE overrides."""
    return os.environ.get("ATTNKERN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def preset_cases():
    return bench_cases.PRESETS[PRESET](device()).cases


def runnable_subjects():
    """Subjects that can run on this device, baseline first (so later ones get their speed-up at once)."""
    names = [name for name, s in all_subjects().items() if s.unavailable(device()) is None]
    base = default_baseline(device(), names)
    return ([base] if base else []) + [n for n in names if n != base]


def case_id(case: Case) -> str:
    return case.label().replace(" ", "-")
