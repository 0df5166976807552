"""The runnable examples in the parallel docstrings (launch, EngineBuilder.parallel,
ParallelEngine) run and print what they say."""

import doctest

import pytest

import dlengine.builder
import dlengine.parallel.front
import dlengine.parallel.launcher


@pytest.mark.parametrize("module", [dlengine.parallel.launcher, dlengine.parallel.front, dlengine.builder],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
