"""Spark jobs end in one line: Spark's own logging goes to a file, a failure becomes one message.

A Spark job (the prefill, the prefill step of `ckv refresh`) runs inside :func:`spark_job_errors`:

- **Spark's log** (log4j2, JVM) goes to the job's log file only, at WARN
  (``pipeline/prefill/spark-log4j2.properties``, shipped with the package; the file is named by the JVM
  system property ``ckv.log.file``). A JVM this process starts gets it from
  ``spark.driver.extraJavaOptions`` (:func:`java_options`, set by ``get_spark``); a JVM already
  running (``spark-submit``, a test session) is re-pointed at it by :func:`route_spark_logs`.
  ``spark-submit`` users pass the same options with ``--driver-java-options`` so that the JVM's
  start-up lines go there too (jobs/demo.sh).
- **The driver's Python log** (``ckv.*`` loggers) is written to the same file.
- **A failure** raised by Spark, the JVM or a Python worker (a task's exception comes back to the
  driver wrapped in a Java stack) is written to the log in full and re-raised as
  :class:`SparkJobError` with one line: what failed, where (a Spark Python worker / Spark (JVM) /
  the driver), the root message (the project's own error message when a worker raised one), what
  to do, and where the log is. Errors the driver raises itself before Spark runs (bad options,
  input, checkpoint) are already one line and pass through unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOG4J_CONFIG = Path(__file__).with_name("spark-log4j2.properties")
LOG_PROPERTY = "ckv.log.file"  # JVM system property naming the log file (read by LOG4J_CONFIG)
RERUN_HINT = "nothing was published, the current store version is unchanged; fix the cause and re-run the job"
_PROJECT_ERROR = re.compile(r"^((?:pipeline|cachestore|model)\.[\w.]*?(\w+)): (.+)$", re.M)
_PYTHON_ERROR = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit)): (.+)$", re.M)
_JAVA_CAUSE = re.compile(r"^(?:Caused by: )?((?:java|javax|org|scala)\.[\w.$]+(?:Exception|Error)): (.+)$", re.M)


class SparkJobError(RuntimeError):
    """A Spark job failed; the message is one line ending with where the full trace was logged."""


def default_log_path(store: str | os.PathLike, job: str = "prefill") -> Path:
    """STORE/logs/<job>-<UTC time>-<pid>.log (unique per run)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path(store) / "logs" / f"{job}-{stamp}-{os.getpid()}.log"


def java_options(log_path: str | os.PathLike) -> str:
    """JVM options that send Spark's log4j2 output (WARN and above) to ``log_path`` only."""
    return f"-Dlog4j2.configurationFile={LOG4J_CONFIG.as_uri()} -D{LOG_PROPERTY}={Path(log_path).resolve()}"


def route_spark_logs(sc: Any, log_path: str | os.PathLike) -> None:
    """Re-point a running JVM's log4j2 at LOG4J_CONFIG writing to ``log_path`` (no console output)."""
    jvm = sc._jvm
    jvm.java.lang.System.setProperty(LOG_PROPERTY, str(Path(log_path).resolve()))
    context = jvm.org.apache.logging.log4j.LogManager.getContext(False)
    context.setConfigLocation(jvm.java.net.URI(LOG4J_CONFIG.as_uri()))


def _where(text: str, exc: BaseException) -> str:
    if "thrown from the Python worker" in text or "PythonException" in type(exc).__name__:
        return "in a Spark Python worker"
    if "Py4J" in type(exc).__name__ or _JAVA_CAUSE.search(text) or type(exc).__module__.startswith("pyspark"):
        return "in Spark (JVM)"
    return "in the driver"


def root_message(exc: BaseException) -> str:
    """The most telling line of a Spark failure: the project's own error raised in a worker, else the
    last Python exception line of a worker trace, else the deepest Java cause, else ``str(exc)``."""
    text = str(exc)
    project = _PROJECT_ERROR.findall(text)
    if project:
        return f"{project[-1][1]}: {project[-1][2].strip()}"
    python = _PYTHON_ERROR.findall(text)
    if python and "thrown from the Python worker" in text:
        name, msg = python[-1]
        return f"{name.rsplit('.', 1)[-1]}: {msg.strip()}"
    java = _JAVA_CAUSE.findall(text)
    if java:
        name, msg = java[-1]
        return f"{name.rsplit('.', 1)[-1]}: {msg.strip()}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def one_line(what: str, exc: BaseException, log_path: Path) -> str:
    """``<what> failed <where>: <root message>; <what to do>; full trace: <log>`` (at most ~1 kB)."""
    text = str(exc)
    msg = " ".join(root_message(exc).split())
    if len(msg) > 800:
        msg = msg[:800] + " …"
    hint = "" if "re-run the job" in msg else f"; {RERUN_HINT}"
    return f"{what} failed {_where(text, exc)}: {msg}{hint}; full trace: {log_path}"


def _file_handler(log_path: Path) -> logging.Handler:
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    return handler


@contextmanager
def spark_job_errors(what: str, log_path: str | os.PathLike, *, verbose: bool = False,
                     passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """Run a Spark job with its Python log in ``log_path``; turn a failure into SparkJobError.

    Exceptions of ``passthrough`` types raised on the driver itself (their message is already one line)
    are re-raised unchanged, after their trace is logged. ``verbose``: the trace is also printed
    to stderr.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = _file_handler(log_path)
    logger, tracer = logging.getLogger("ckv"), logging.getLogger("ckv-trace")
    tracer.propagate = False  # the trace goes to the file only (the console gets one line)
    for lg in (logger, tracer):
        lg.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logging.getLogger("py4j").setLevel(logging.WARNING)  # its INFO lines ("Closing down ...") are noise
    try:
        yield log_path
    except Exception as exc:
        trace = "".join(traceback.format_exception(exc))
        tracer.error("%s failed:\n%s", what, trace)
        if verbose:
            print(trace, file=sys.stderr, flush=True)
        if isinstance(exc, passthrough) and type(exc).__module__.split(".")[0] not in ("pyspark", "py4j"):
            raise
        raise SparkJobError(one_line(what, exc, log_path)) from exc
    finally:
        for lg in (logger, tracer):
            lg.removeHandler(handler)
        handler.close()
