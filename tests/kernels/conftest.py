"""Fixtures for the Triton kernel tests.

With a GPU the kernels are compiled and run on CUDA.  Without one they run on CPU through Triton's
interpreter, which is chosen when ``@triton.jit`` decorates a function, i.e. when
``bitcliff.kernels.qmatmul`` is imported: ``TRITON_INTERPRET=1`` is set for that import (and the
module re-imported if something loaded it compiled before) and, since parts of Triton consult it
while an interpreted kernel runs, during each test of this directory; it is restored afterwards,
so the environment of the rest of the suite is left as it was.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"


def _triton_compiled_mode() -> bool:
    """Whether Triton was imported without the interpreter (its own jit helpers, e.g. cdiv, compiled)."""
    if "triton" not in sys.modules:
        return False
    import triton  # noqa: PLC0415

    return isinstance(triton.language.standard.cdiv, triton.runtime.JITFunction)


# Every module that defines @triton.jit functions (the decorator chooses compiled or interpreted
# when the module is imported), the launcher last.
KERNEL_MODULES = ("bitcliff.kernels.epilogue", "bitcliff.kernels.gemv", "bitcliff.kernels.tiled",
                  "bitcliff.kernels.qmatmul")


def load_kernels():
    """``bitcliff.kernels.qmatmul``: compiled on CUDA machines, interpreted otherwise."""
    name = "bitcliff.kernels.qmatmul"
    if ON_CUDA:
        return importlib.import_module(name)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        if _triton_compiled_mode():
            # Something imported Triton for compilation first (e.g. torch._dynamo): the
            # interpreter also needs Triton's own library functions interpreted, so import a
            # fresh copy of its Python modules (modules holding the old one keep it; the
            # compiled extension triton._C is kept, it cannot be loaded twice).
            stale = [m for m in sys.modules
                     if (m == "triton" or m.startswith("triton.")) and not m.startswith("triton._C")]
            for mod in stale:
                del sys.modules[mod]
            for mod in KERNEL_MODULES:
                sys.modules.pop(mod, None)
        module = sys.modules.get(name)
        if module is None:
            module = importlib.import_module(name)
        elif not module.INTERPRETED:
            for mod in KERNEL_MODULES:
                sys.modules.pop(mod, None)
            module = importlib.import_module(name)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    assert module.INTERPRETED
    return module


if not ON_CUDA:
    load_kernels()  # before any test module of this directory imports Triton


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here, or None.

    Triton 3.6's interpreter turns one-element arrays into Python ints with ``int()``, which NumPy
    2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars") at every loop with
    run-time bounds; Triton 3.7 fixed it.  Compiled on a GPU, 3.6 runs the kernels fine.
    """
    import numpy
    import triton

    def version(text):
        return tuple(int(part) for part in text.split("+")[0].split(".")[:2])

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__}: "
                "the interpreted kernel tests need Triton >= 3.7 (the test extra asks for it)")
    return None


def pytest_collection_modifyitems(config, items):
    problem = None if ON_CUDA else interpreter_problem()
    if problem:
        for item in items:
            if "interpret" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture(autouse=True)
def _interpret_env(monkeypatch):
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def kernels():
    return load_kernels()


@pytest.fixture(scope="session")
def device():
    return DEVICE
