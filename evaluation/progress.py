"""Progress bars that stay readable in log files.

In a terminal tqdm redraws one line in place. When stderr goes to a file (a batch job's log, ``cmd > log 2>&1``)
every redraw is appended instead, and the default refresh (every 0.1 s) piles up hundreds of bars. With these
options a bar written to anything but a terminal refreshes at most once a minute (plus its first and last state).
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional, TextIO

#: Seconds between two refreshes of a bar that is not written to a terminal.
LOG_INTERVAL_S = 60.0


def progress_options(stream: Optional[TextIO] = None) -> Dict[str, Any]:
    """Keyword arguments for ``tqdm(...)`` writing to ``stream`` (default stderr, tqdm's own default)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return {}
    return {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S}
