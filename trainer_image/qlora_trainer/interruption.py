"""What a SIGTERM asks of the run: cli.py's handler sets it, the training loop and the publication
read it. A module of its own so that the handler is in place before the training libraries import
(startup_thread.py)."""

from dataclasses import dataclass


@dataclass
class Interruption:
    """Set by the SIGTERM handler while training runs: the loop saves a checkpoint and stops.
    While the adapter is being published, a SIGTERM lets the publication finish instead (see cli.py)."""

    requested: bool = False
    training: bool = False
    publishing: bool = False
    requested_at: float | None = None  # time.monotonic() of the SIGTERM: the grace period runs from it
