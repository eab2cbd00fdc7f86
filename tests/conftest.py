"""Shared fixtures and guards for the suite.

- One local SparkSession for every @pytest.mark.spark test (started on first use).
- Torch runs one intra-op thread in the test process: the tensors here are small, and OpenMP's spinning
  threads only contend with the Spark JVM and the servers the tests start on a 2-core machine.
- A hard limit per test (CKV_TEST_TIMEOUT_S, default 600 s): a test that hangs fails with every thread's
  stack printed, instead of using up the CI run.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():  # run Triton kernels (cachestore.decode.fused) under its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)

TEST_TIMEOUT_S = int(os.environ.get("CKV_TEST_TIMEOUT_S", "600"))


class TestTimeout(Exception):
    """A test ran past TEST_TIMEOUT_S."""


def _on_alarm(signum: int, frame: Any) -> None:
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    raise TestTimeout(f"test ran past {TEST_TIMEOUT_S} s (CKV_TEST_TIMEOUT_S); stacks above")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Arm SIGALRM around setup + call + teardown of one test (main thread, POSIX only)."""
    armed = TEST_TIMEOUT_S > 0 and hasattr(signal, "SIGALRM")
    if armed:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        if armed:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _torch_grad_mode_restored() -> Iterator[None]:
    """Each test starts with autograd on and cannot leave it off for the next one (a benchmark's ``main``
    called in-process turns it off for its own process, as a script should)."""
    torch.set_grad_enabled(True)
    yield
    torch.set_grad_enabled(True)


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    """local[2], 1g driver, no UI, 2 shuffle partitions; workers run this interpreter."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("ckv-tests")
        .config("spark.driver.memory", "1g")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
