"""The examples in the public docstrings run and print what they show."""

import doctest
import importlib

import pytest

MODULES = ["moonjax._src.api", "moonjax._src.check", "moonjax._src.fidelity",
           "moonjax._src.filtered", "moonjax._src.errors", "moonjax._src.rules"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, x32):
    from moonjax._src.rules import vijp_rules

    saved = dict(vijp_rules)
    try:
        result = doctest.testmod(importlib.import_module(name),
                                 optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    finally:  # an example may register a rule: leave the registry as it was
        vijp_rules.clear()
        vijp_rules.update(saved)
    assert result.failed == 0 and result.attempted > 0, result


def test_every_public_function_says_its_arguments_and_results():
    import inspect

    import moonjax

    for name in moonjax.__all__:
        obj = getattr(moonjax, name)
        if not inspect.isfunction(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        assert "Args:" in doc and ("Returns:" in doc or "Raises:" in doc), name
        assert "Example" in doc, name
