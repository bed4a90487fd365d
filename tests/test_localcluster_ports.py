"""Ports for private clusters and test processes: below the kernel's ephemeral range (an outgoing
connection can never take them), and reserved per process so parallel test workers never pick the
same one. No cluster needed."""

import os
import socket
import subprocess
import sys

from qlora_localcluster import testing


def _held_by_other_process(port: int) -> bool:
    """Whether a fresh process fails to reserve `port` (it sees this process's reservation)."""
    code = f"from qlora_localcluster import testing; print(testing._reserve({port}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    return out.stdout.strip() == "False"


def test_ports_are_distinct_below_the_ephemeral_range_bindable_and_reserved_for_this_process():
    ports = testing.free_ports(6)
    base = testing.free_port_block(3)
    try:
        everything = [*ports, base, base + 1, base + 2]
        assert len(set(everything)) == len(everything)
        assert all(testing._RESERVED_FROM <= p < testing._ephemeral_start() for p in everything), everything
        for port in everything:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))  # free now
            assert (testing._RESERVATIONS / str(port)).read_text() == str(os.getpid())
        assert _held_by_other_process(ports[0]) and _held_by_other_process(base + 2)
    finally:
        testing.release_ports([*ports, base, base + 1, base + 2])
    assert not any((testing._RESERVATIONS / str(p)).exists() for p in [*ports, base + 2])
    assert not _held_by_other_process(ports[0])  # given back: another process may take it (and did)


def test_a_reservation_of_a_process_that_is_gone_is_taken_over():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    port = testing.free_port_block(1)
    testing.release_ports([port])
    (testing._RESERVATIONS / str(port)).write_text(gone.stdout.strip())  # as a crashed worker left it
    try:
        assert testing._reserve(port)
        assert (testing._RESERVATIONS / str(port)).read_text() == str(os.getpid())
    finally:
        testing.release_ports([port])
