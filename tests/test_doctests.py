"""The runnable examples in the front's and the proposers' docstrings run and print what they say
(the builder's and the parallel modules' are run by test_parallel_doctests.py)."""

import doctest

import pytest

import dlengine.engine.engine


@pytest.mark.parametrize("module", [dlengine.engine.engine], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
