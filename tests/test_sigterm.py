"""SIGTERM ends set-up at once, and only asks training to stop once caught."""

from __future__ import annotations

import os
import signal

from job import sigterm


def test_until_caught_sigterm_is_the_default_then_it_only_sets_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with sigterm.handled() as termination:
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # set-up just ends
        termination.catch()
        assert not termination.received()
        os.kill(os.getpid(), signal.SIGTERM)
        assert termination.received()
    assert signal.getsignal(signal.SIGTERM) == before


def test_reclaim_keeps_pythons_handler_in_place():
    with sigterm.handled() as termination:
        termination.catch()
        handler = signal.getsignal(signal.SIGTERM)
        sigterm.reclaim()
        assert signal.getsignal(signal.SIGTERM) == handler
