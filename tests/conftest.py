"""Test configuration: float64 references, and slow benchmarks behind --runslow."""

import pathlib

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


# Tests measured slow (tests/slow.txt, one node id a line): the slowest tests of a
# `pytest --durations=0` run on 2 cores, leaving each parametrized test's cheapest case in
# the default run, until that run takes under 7 minutes. They run with --runslow (CI).
SLOW_LIST = pathlib.Path(__file__).with_name("slow.txt")


def _measured_slow() -> set[str]:
    if not SLOW_LIST.exists():
        return set()
    lines = (ln.strip() for ln in SLOW_LIST.read_text().splitlines())
    return {ln for ln in lines if ln and not ln.startswith("#")}


@pytest.hookimpl(tryfirst=True)  # before `-m slow` selects by the markers
def pytest_collection_modifyitems(config, items):
    measured = _measured_slow()
    for item in items:
        if item.nodeid in measured:
            item.add_marker(pytest.mark.slow)
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
