"""Process logging for the long-running commands (`serve`, `launch ray`): text or one JSON object per line.

JSON lines carry ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg`` and,
for errors, ``exc`` (the exception type and message — not a multi-line
traceback), so a log shipper can index them without parsing prose.
"""

from __future__ import annotations

import json
import logging
import time

__all__ = ["JsonFormatter", "configure_logging", "LOG_FORMATS"]

LOG_FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            out["exc"] = f"{type(e).__name__}: {e}"
        return json.dumps(out, ensure_ascii=False)


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Root logging to stderr in ``fmt`` (``text`` or ``json``), replacing earlier handlers."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
