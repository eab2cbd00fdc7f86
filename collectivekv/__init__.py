"""collectivekv: one installed namespace over the repository's packages.

``collectivekv.model``, ``collectivekv.pipeline``, ``collectivekv.cachestore`` and ``collectivekv.jobs`` are
the repository's top-level folders ``model/``, ``pipeline/``, ``cachestore/`` and ``jobs/``. An installed
wheel holds them inside this package (pyproject.toml maps each folder); an editable install or a source
checkout on ``PYTHONPATH`` (the repository root) finds them beside this folder, so the same import names work
in all three without claiming generic top-level names in site-packages.
"""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_HERE, "model")):  # a source checkout: the packages are the repo's folders
    __path__ = [os.path.dirname(_HERE)]  # noqa: F821 — a package's search path, set for its submodules
