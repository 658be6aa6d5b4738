"""pytest plugin loaded only by mutmut (``[tool.mutmut]`` in pyproject.toml): import the mutated copies.

mutmut runs the tests inside ``mutants/`` with that folder first on ``sys.path``, which covers ``meloformer``;
but the editable install maps ``meloformer.datamodules`` and ``meloformer.callbacks`` to their source
folders. Registering them from ``mutants/`` before any test imports them puts the mutants under test.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import meloformer

for name in ("datamodules", "callbacks"):
    folder = Path.cwd() / name
    spec = importlib.util.spec_from_file_location(
        f"meloformer.{name}", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    setattr(meloformer, name, module)
    spec.loader.exec_module(module)
