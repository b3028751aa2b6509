"""pytest plugin for gpu-check's test stage (`-p secateur.gpucheck.pytest_plugin`): one JSON line
per test phase, appended to $SECATEUR_GPUCHECK_TESTS_JSONL the moment it is known, so a stage that
is killed at its timeout still leaves the results of every test that finished."""
from __future__ import annotations

import json
import os


def _message(report) -> str:
    if report.passed:
        return ""
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:          # a skip: (path, line, "Skipped: reason")
        return str(lr[2])
    text = getattr(report, "longreprtext", "") or str(lr or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E ")]
    return (errors[0][1:].strip() if errors else (lines[-1] if lines else ""))[:300]


def _write(rec: dict) -> None:
    path = os.environ.get("SECATEUR_GPUCHECK_TESTS_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def pytest_runtest_logreport(report) -> None:
    _write({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "duration": round(float(report.duration), 4), "message": _message(report)})


def pytest_collectreport(report) -> None:
    if report.failed:
        _write({"nodeid": report.nodeid, "when": "collect", "outcome": "failed", "duration": 0.0,
                "message": _message(report)})
