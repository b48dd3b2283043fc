"""Test configuration: float64 references, and slow benchmarks behind --runslow."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def x64():
    """float64 on for the test, restored after it (the suite turns it on globally; a
    test that needs it says so)."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


@pytest.fixture
def x32():
    """float32 as users run it (the suite turns float64 on globally)."""
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", True)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (benchmarks)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
