"""job.collector: the cycle collector is paused while TensorFlow starts up, and
a process that runs several jobs (the tests, a notebook) gets it back as it was."""

from __future__ import annotations

import gc

import pytest

from job import collector


@pytest.fixture
def gc_restored():
    """Leave the collector as this test found it, whatever the test does."""
    was_enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if was_enabled:
        gc.enable()
    else:
        gc.disable()


@pytest.mark.parametrize("enabled", [True, False])
def test_paused_turns_the_collector_off_and_leaves_it_as_it_was(gc_restored, enabled):
    gc.enable() if enabled else gc.disable()
    with collector.paused():
        assert not gc.isenabled()
    assert gc.isenabled() is enabled
    assert gc.get_freeze_count() == 0


def test_startup_done_freezes_what_exists_and_turns_the_collector_back_on(gc_restored):
    gc.enable()
    with collector.paused() as startup_done:
        startup_done()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0  # start-up's objects: later collections skip them
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0  # unfrozen: the next job can collect them


def test_startup_done_keeps_a_collector_that_was_off_off(gc_restored):
    # A program that runs with gc disabled does not get it turned on.
    gc.disable()
    with collector.paused() as startup_done:
        startup_done()
        assert not gc.isenabled()
    assert not gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_failing_block_leaves_the_collector_as_it_was(gc_restored):
    gc.enable()
    with pytest.raises(RuntimeError, match="start-up failed"), collector.paused() as startup_done:
        startup_done()
        raise RuntimeError("start-up failed")
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
