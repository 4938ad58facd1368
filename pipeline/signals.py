"""Signals a driver must keep handling around Ray: the one home of SIGTERM and SIGINT handling.

SIGTERM (`ray job stop`, `timeout`, `kill`, schedulers) must end a driver through its `finally`
blocks, so the services it started are stopped and nothing half-written is left trusted:

    with sigterm_raises_exit():     # SIGTERM -> SystemExit(143) in the main thread
        ... ray.init(...); reclaim_sigterm(before)   # Ray's C++ handler would kill us on the spot

Ctrl-C keeps working around libraries that take SIGINT over (Ray Train's `TorchTrainer.fit()`).

Ray Train 2.60 (Train V2) installs its own SIGINT handler in the driver when `fit()` starts and never
restores the previous one. Its handler asks the training controller to abort; once training is
over, that controller has finished, the request does nothing, and every later Ctrl-C in the same
driver (e.g. during generation and evaluation after training) is swallowed: the process goes on.
Inside `fit()` a Ctrl-C does abort the run, but surfaces as `SystemExit(1)` with no message.

    with keep_python_sigint_handler():
        result = trainer.fit()

restores SIGINT's handler when the block ends and, if a SIGINT arrived inside, raises
KeyboardInterrupt instead of whatever the library's handler caused (SystemExit, a Ray error, or a
normal return with an aborted result), so callers handle Ctrl-C the same in every stage.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def sigterm_raises_exit() -> Iterator[None]:
    """While inside, SIGTERM raises SystemExit(128 + 15) in the main thread instead of killing us outright.

    By default Python dies of SIGTERM without running `finally` blocks, leaving the services running.
    Only the default handler is replaced (a caller's own handler, e.g. an outer `sigterm_raises_exit`,
    stays), and it is restored on exit; off the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def _raise(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def reclaim_sigterm(before=None) -> None:
    """Call after ray.init(): give SIGTERM back to a Python handler (`before`, the one in place
    before ray.init, if it was a Python function; else the sys.exit one ray.init set).

    A driver's core worker installs Ray's C++ failure-signal handler for SIGTERM over Python's.
    A SIGTERM then prints "*** SIGTERM received" and ends the process on the spot, skipping every
    `finally` block, so the S3 server and Ray head we started kept running after `kill`.
    Installing a Python handler again puts the cleanup back. Only possible from the main thread.
    """
    handler = before if callable(before) else signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread() and callable(handler):
        signal.signal(signal.SIGTERM, handler)


def _drain(fd: int) -> bytes:
    data = b""
    with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
        while chunk := os.read(fd, 512):
            data += chunk
    return data


@contextlib.contextmanager
def keep_python_sigint_handler() -> Iterator[None]:
    """Restore SIGINT's handler after the block; a SIGINT received inside ends it with KeyboardInterrupt.

    SIGINT is noticed with `signal.set_wakeup_fd` (the interpreter writes the number of each signal
    that has a Python handler to it), which does not depend on whose handler is installed. If
    something else already uses the wakeup fd (an asyncio loop in this thread), only the handler is
    restored. Off the main thread this does nothing (handlers can only be set there).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    watching = False
    try:
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        if old == -1:
            watching = True
        else:
            signal.set_wakeup_fd(old)  # someone else's: leave it alone
    except (ValueError, OSError):
        pass

    def interrupted() -> bool:
        return watching and bytes([signal.SIGINT]) in _drain(r)

    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        if interrupted():
            raise KeyboardInterrupt from e
        raise
    else:
        if interrupted():
            raise KeyboardInterrupt
    finally:
        if watching:
            with contextlib.suppress(ValueError, OSError):
                signal.set_wakeup_fd(-1)
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        os.close(r)
        os.close(w)
