"""Interruption is never success: SIGINT (Ctrl-C) and SIGTERM (how Kubernetes and `ray job stop` end a
job) end a run as interrupted, with the shell's exit code for the signal (130, 143).

Within `interruptible()`, either signal raises `Interrupted` in the main thread, where the pipeline runs:
it unwinds the running stage like a crash of the driver would, so the stage's folder is never swapped
in or marked done, and the next run of the same command continues (an interrupted sweep resumes from
its trials' checkpoints). Ray Tune's own SIGINT handler is turned off: it ends the sweep "gracefully",
returning from `Tuner.fit()` as if the sweep were complete, and a stage would then be written as done
with trials it never finished deciding. A second signal while the run winds down gets the default
behaviour (a second Ctrl-C force-quits).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised by a stop signal. A BaseException, as KeyboardInterrupt is: `except Exception` handlers on
    the way up (a stage's own, Ray Tune's loop) must not take it for a failure to record and carry on."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by the signal


_armed = False  # inside interruptible(), before a first signal
_received: int | None = None  # the signal that arrived inside interruptible()


def _stop(signum: int, frame) -> None:
    global _armed, _received
    _armed, _received = False, signum
    for s in SIGNALS:  # winding down: a second signal is not turned into a second unwinding
        signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)
    raise Interrupted(signum)


def interruption(exc: BaseException) -> Interrupted | None:
    """The interruption behind an exception: Interrupted itself, or whatever a library raised while one was
    on its way (an exception raised by a signal handler inside Ray's C++ calls comes out as a SystemError,
    "returned a result with an exception set"). None for a real failure."""
    if isinstance(exc, Interrupted):
        return exc
    return Interrupted(_received) if _received is not None else None


def reclaim() -> None:
    """Put the handlers back after a library replaced them: `ray.init` installs a SIGTERM handler that
    exits the process (SystemExit, caught nowhere as an interruption). Called once Ray is started."""
    if _armed and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _stop)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted inside the block (the main thread only: signal handlers
    cannot be installed elsewhere, and there the block runs unchanged)."""
    global _armed, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    tune_handler = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    _armed, _received = True, None
    reclaim()
    try:
        yield
    except BaseException as exc:
        stop = interruption(exc)
        if stop is not None and stop is not exc:  # what a library made of it leaves here as the interruption
            raise stop from exc
        raise
    finally:
        _armed, _received = False, None  # a later failure is a failure
        for s, handler in previous.items():
            signal.signal(s, handler)
        if tune_handler is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_handler
