"""Logging for the CLI: one readable line per event, secrets never printed."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY)", re.IGNORECASE)
MIN_SECRET_LEN = 8  # shorter values would redact ordinary words


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names say they are secrets (HF_TOKEN, ...)."""
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


class RedactSecrets(logging.Filter):
    """Replaces any secret value from the environment with '***' in the formatted message."""

    def __init__(self, environ: dict[str, str] | None = None):
        super().__init__()
        self._environ = environ

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_values(self._environ)
        if secrets:
            msg = record.getMessage()
            for s in secrets:
                msg = msg.replace(s, "***")
            record.msg, record.args = msg, None
        return True


FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("damoc")
    root.setLevel(level)
    if not any(getattr(h, "_damoc", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(RedactSecrets())
        handler._damoc = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False


def log_to_file(path: Path) -> logging.Handler:
    """Also write damoc's log to `path` (the run directory's log), redacted the same way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactSecrets())
    logging.getLogger("damoc").addHandler(handler)
    return handler
