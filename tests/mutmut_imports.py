"""pytest plugin loaded only by mutmut (``[tool.mutmut]`` in pyproject.toml): test the mutated datamodules.

mutmut runs the tests inside ``mutants/``, first on ``sys.path``, and a mutant is active only in the module
named after its file's path (``datamodules.rows``); but the editable install maps ``meloformer.datamodules``
to the source folder. So ``meloformer.datamodules[.X]`` is imported as the mutated ``datamodules[.X]``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

PREFIX = "meloformer.datamodules"


class MutatedDatamodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == PREFIX or fullname.startswith(PREFIX + "."):
            return importlib.util.spec_from_loader(fullname, self, is_package=fullname == PREFIX)
        return None

    def create_module(self, spec):
        return importlib.import_module(spec.name.removeprefix("meloformer."))

    def exec_module(self, module) -> None:
        pass  # already executed under its path name


sys.meta_path.insert(0, MutatedDatamodules())
