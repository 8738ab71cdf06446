"""Code a dataset folder ships: the ``generator`` source, loaded from the folder as a module.

A dataset whose rows come from a program (``source.kind: generator``) keeps that program in its
own folder (``source.path``, e.g. ``generator.py``). Keel runs the file as a module of the
name it is asked for, so the daily loop imports the loop dataset's generator as
``keel.generator`` and pickles, tracebacks and ``inspect`` all point at the folder's file.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from keel.datasets.spec import DatasetSpec, SpecError


def generator_module(spec: DatasetSpec, module_name: str) -> ModuleType:
    """Run the dataset's generator file as ``module_name`` (registered in ``sys.modules``)."""
    if spec.source.kind != "generator" or not spec.source.path:
        raise SpecError(
            f"dataset {spec.name!r} has no generator file (source.kind {spec.source.kind}, "
            f"source.path {spec.source.path!r})"
        )
    path = (spec.folder / spec.source.path).resolve()
    if path.suffix != ".py" or not path.is_file():
        raise SpecError(f"dataset {spec.name!r}: generator {path} is not a Python file")
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise SpecError(f"dataset {spec.name!r}: cannot load the generator {path}")
    module = importlib.util.module_from_spec(loader_spec)
    # Dataclasses and pickles look the module up by name while and after it runs.
    previous = sys.modules.get(module_name)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        if previous is None:
            sys.modules.pop(module_name, None)
        else:
            sys.modules[module_name] = previous
        raise
    return module
