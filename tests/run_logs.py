"""What a failed job subprocess left, for assertion messages: its own output without the Ray worker
lines streamed into it, and the ends of its Ray head's logs (raylet, GCS, the driver's core worker).

A driver whose raylet dies exits with code 1 and no traceback (Ray's core worker ends the process),
and the worker lines streamed to its stderr can push the driver's own last words out of a plain tail:
CI once reported only a placement-group cleaner's traceback for such a run.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

#: Ray prefixes lines it streams from workers with "(Name pid=N)", in colour on a terminal.
_WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\((\w+ )?pid=\d+")
RAY_LOGS = ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err", "python-core-driver-*.log")


def _tail(text: str, chars: int) -> str:
    return text if len(text) <= chars else "[...]" + text[-chars:]


def ray_log_tails(run_dir: str, lines: int = 15) -> str:
    """The last `lines` lines of each of the head's logs in RUN_DIR/ray (LocalRay copies them there)."""
    out = []
    for session in sorted(glob.glob(os.path.join(run_dir, "ray", "session_2*"))):
        for pattern in RAY_LOGS:
            for path in sorted(glob.glob(os.path.join(session, "logs", pattern))):
                with open(path, errors="replace") as f:
                    tail = f.readlines()[-lines:]
                if tail:
                    out.append(f"--- {os.path.relpath(path, run_dir)}:\n" + "".join(tail))
    return "\n".join(out) or f"(no Ray logs under {run_dir}/ray)"


def explain(proc: subprocess.CompletedProcess, run_dir: str | None = None, chars: int = 4000) -> str:
    """Exit code, stdout's end, stderr's end without worker lines, then the Ray logs' ends."""
    own = "".join(line for line in proc.stderr.splitlines(keepends=True) if not _WORKER_LINE.match(line))
    parts = [f"exit code {proc.returncode}", "--- stdout:", _tail(proc.stdout, chars),
             "--- stderr (worker lines left out):", _tail(own, chars)]
    if run_dir is not None:
        parts.append(ray_log_tails(run_dir))
    return "\n".join(parts)
