"""Fixtures for integration tests that drive real DICOM tools.

Fixtures:
    orthanc         -- a fresh Orthanc per test (costs ~3.5 s: Orthanc 1.10's shutdown).
    orthanc_module  -- one Orthanc shared by the tests of a module (state accumulates).

Helpers (import them from ``dicom_tools``): free_port, storescu, dciodvfy_errors,
OrthancServer, run_orthanc and the skip markers requires_orthanc,
requires_storescu, requires_dciodvfy.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # also works under --import-mode=importlib
    sys.path.insert(0, _HERE)

from dicom_tools import (  # noqa: E402
    OrthancServer,
    dciodvfy_errors,
    find_orthanc,
    free_port,
    run_orthanc,
    storescu,
)

__all__ = ["OrthancServer", "dciodvfy_errors", "free_port", "storescu"]


def _orthanc(workdir: Path) -> Iterator[OrthancServer]:
    if find_orthanc() is None:
        pytest.skip("Orthanc not installed: neither /usr/sbin/Orthanc nor Orthanc on PATH")
    with contextlib.ExitStack() as stack:  # stops Orthanc even when the test fails
        try:
            server = stack.enter_context(run_orthanc(workdir))
        except RuntimeError as exc:  # carries Orthanc's log
            pytest.fail(str(exc), pytrace=False)
        yield server


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """An empty Orthanc (deploy/orthanc/orthanc.json, free ports, storage in tmp_path)."""
    yield from _orthanc(tmp_path / "orthanc")


@pytest.fixture(scope="module")
def orthanc_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """Like ``orthanc`` but shared by all tests in a module; tests must tolerate others' data."""
    yield from _orthanc(tmp_path_factory.mktemp("orthanc"))
