"""Ctrl-C keeps working around libraries that take SIGINT over (Ray Train's `TorchTrainer.fit()`).

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
