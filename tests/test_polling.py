"""support.polling.wait_for, which the cluster tests wait with: it returns the check's first truthy
value, and a timeout names what was awaited, the last value and what `explain` adds."""

import time

import pytest
from support.polling import wait_for


def test_wait_for_returns_the_first_truthy_value():
    values = iter([None, 0, {}, {"phase": "Running"}, {"phase": "later"}])
    assert wait_for("a phase", lambda: next(values), timeout=5, every=0.01) == {"phase": "Running"}


def test_a_timeout_names_what_was_awaited_the_last_value_and_the_explanation():
    started = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        wait_for("the Lease released", lambda: [], timeout=0.2, every=0.05, explain=lambda: "operator log:\nboom")
    assert 0.2 <= time.monotonic() - started < 2
    assert str(failed.value) == "no the Lease released after 0.2 s; last: []\noperator log:\nboom"


def test_the_check_runs_once_more_at_the_deadline():
    """A check that holds only after the deadline's last sleep still counts: no wait is lost to the clock."""
    calls = []

    def check():
        calls.append(time.monotonic())
        return len(calls) >= 3

    assert wait_for("three calls", check, timeout=0.1, every=0.06) is True
