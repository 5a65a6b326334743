"""The runnable examples in the docstrings of the library and the benchmark harness (so that ``pytest tests``
checks them)."""
import doctest
import importlib

import pytest

# module -> whether it must contain at least one example
MODULES = {
    "twilight.config": False,
    "twilight.selection": True,
    "twilight.quant": True,
    "twilight.cache": True,
    "twilight.estimate": True,
    "twilight.attention": True,
    "twilight.prune": True,
    "twilight.pipeline": True,
    "twilight.select": False,
    "twilight.select.double_sparse": True,
    "twilight.stats": False,
    "twilight.backends": False,
    "twilight.diagnostics": True,
    "twilight_bench.common": True,
    "twilight_bench.profiles": True,
    "twilight_eval.report": True,
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in doctest.DocTestFinder().find(module):
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, "".join(report)
    if MODULES[name]:
        assert results.attempted > 0, f"{name} lost its docstring examples"
