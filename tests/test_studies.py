"""The study helpers: threads per side-by-side job, the order methods start in, and the code version a result
names."""

from __future__ import annotations

import os
import subprocess

import pytest

from eblvm import studies
from eblvm.errors import ConfigError
from eblvm.studies import Method, code_version, provenance, threads_per_job


def test_threads_per_job_share_the_cores_unless_omp_num_threads_is_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_per_job(1) == (os.cpu_count() or 1)
    assert threads_per_job(10 * (os.cpu_count() or 1)) == 1
    for configured, threads in (("3", 3), ("4,2", 4)):
        monkeypatch.setenv("OMP_NUM_THREADS", configured)
        assert threads_per_job(2) == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS='many'"):
        threads_per_job(2)


def test_provenance_names_the_version_it_is_given():
    version = code_version()
    assert version.startswith("`") and len(version.split("`")[1]) >= 7
    text = provenance("python x.py", "`abc1234`", 90.0)
    assert "- commit: `abc1234`\n" in text and "- wall-clock time: 1.5 min" in text
    assert "- training time, summed over runs: 2.0 min" in provenance("python x.py", version, None, 120.0)


def test_a_study_starts_its_costliest_methods_first(tmp_path, monkeypatch):
    started = []

    def run(command, **kwargs):
        started.append(next(arg for arg in command if arg.startswith("hydra.run.dir=")).rsplit("/", 1)[1])
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(studies.subprocess, "run", run)
    methods = [Method("cheap", (), cost=1.0), Method("dear", (), cost=9.0), Method("middle", (), cost=3.0)]
    studies.launch_ensembles(methods, [], [1, 2], tmp_path, jobs=1)
    assert started == ["dear", "middle", "cheap"]
