"""Every docstring example in the package runs and prints what it says.

One test per module, found by walking the package: a new module's examples
are tested without registering anything.
"""

import doctest
import importlib
import pkgutil

import keras
import numpy as np
import pytest

import tf_sparsity

# Modules whose import has side effects a test process must not have.
_NOT_IMPORTED = {"tf_sparsity.cli", "tf_sparsity.demo"}


def _modules():
    names = ["tf_sparsity"]
    for info in pkgutil.walk_packages(tf_sparsity.__path__, prefix="tf_sparsity."):
        if info.name not in _NOT_IMPORTED:
            names.append(info.name)
    return sorted(names)


def _examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    globs = {"tfs": tf_sparsity, "np": np, "keras": keras}
    tests = finder.find(module, name, globs={**globs, **vars(module)})
    return [t for t in tests if t.examples]


def test_the_walk_finds_examples():
    counted = {name: sum(len(t.examples) for t in _examples(name)) for name in _modules()}
    assert sum(counted.values()) >= 60, counted
    for name in ("tf_sparsity.ops", "tf_sparsity.budget", "tf_sparsity.schedules", "tf_sparsity.recipes"):
        assert counted[name] > 0, name


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(name):
        keras.utils.set_random_seed(0)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name} (see the output above)"
