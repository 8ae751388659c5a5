"""How a run ends when it does not finish: one line, printed once, and an exit status.

    with sigint_stops():                   # Ctrl-C raises Interrupted (once), not KeyboardInterrupt
        ...
    code, line = outcome(err)              # (status, the line to print) for what ended the run

* a user's mistake (``ConfigError``, ``CheckpointError``: a bad flag, file or checkpoint) is
  ``error: ...`` with status 2; every rank raises the same one (each checks the same flags and
  files), so rank 0 alone prints it (``print_once``) and torchrun reports the status without a
  stack from our code;
* a run stopped on purpose (``RunStopped``: a NaN/inf loss or gradient) is ``error: ...``
  with status 1, decided by one collective, so again the same on every rank;
* a save for a new rendezvous (``StoppedForRendezvous``, --save-on-rendezvous-change: SIGTERM
  agreed by every rank, the checkpoint written) is one line with status 143, the shell's code for
  SIGTERM: not 0, so that torchrun starts new workers rather than ending the job;
* Ctrl-C (SIGINT) is ``interrupted ...`` with status 130, the shell's code for it.  Under a
  terminal or torchrun every rank gets the signal (torchrun forwards it), and a rank blocked in a
  collective may first see its peer vanish (a gloo/NCCL error): any error after the signal is the
  interruption's.  With ``--exit-signal-handler`` the trainer takes SIGINT over instead (save,
  then stop, as on SIGTERM).

Anything else is a bug and keeps its traceback.  This module imports nothing heavy, so the
entry point installs the SIGINT handler before importing torch (a Ctrl-C during start-up is clean
too).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys



class RunStopped(RuntimeError):
    """Training stopped on a condition every rank agreed on; the message is one line."""


class StoppedForRendezvous(RuntimeError):
    """SIGTERM under --save-on-rendezvous-change: every rank saved at ``iteration`` and exits for
    torchrun's next round."""

    def __init__(self, iteration: int) -> None:
        super().__init__(f"SIGTERM received: saved at iteration {iteration}; exiting with status 143 so that "
                         f"torchrun starts the workers of the next rendezvous (--save-on-rendezvous-change)")


class Interrupted(BaseException):
    """SIGINT arrived (Ctrl-C). ``iteration``: the last completed one, when training had begun."""

    def __init__(self, iteration: int | None = None) -> None:
        super().__init__("interrupted")
        self.iteration = iteration


class _SigintState:
    received = False


_SIGINT = _SigintState()


def _raise_interrupted(signum, frame) -> None:
    if _SIGINT.received:  # torchrun forwards the terminal's Ctrl-C: the second copy is the same one
        return
    _SIGINT.received = True
    raise Interrupted()


@contextlib.contextmanager
def sigint_stops():
    """Inside, the first SIGINT raises ``Interrupted``; the previous handler is restored on exit."""
    previous = signal.signal(signal.SIGINT, _raise_interrupted)
    _SIGINT.received = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def note_sigint() -> None:
    """Record a SIGINT that another handler took (--exit-signal-handler), so a collective error
    that follows it is reported as the interruption."""
    _SIGINT.received = True


def outcome(err: BaseException) -> tuple[int, str] | None:
    """(exit status, the one line to print) for ``err``; None for a bug (keep its traceback)."""
    from megamoe.checkpointing.format import CheckpointError
    from megamoe.training.arguments import ConfigError

    if isinstance(err, (ConfigError, CheckpointError)):
        return 2, f"error: {err}"
    if isinstance(err, RunStopped):
        return 1, f"error: {err}"
    if isinstance(err, StoppedForRendezvous):
        return 143, str(err)
    if isinstance(err, (Interrupted, KeyboardInterrupt)) or _SIGINT.received:
        where = f" after iteration {err.iteration}" if isinstance(err, Interrupted) and err.iteration else ""
        return 130, (f"interrupted (SIGINT){where}: stopped without saving "
                     f"(--exit-signal-handler saves a checkpoint first)")
    return None


def print_once(prog: str, line: str) -> None:
    """Print ``prog: line`` on stderr on global rank 0 only (every rank reaches the same line)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: {line}", file=sys.stderr, flush=True)
