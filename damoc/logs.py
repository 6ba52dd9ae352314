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


def terminal_handler() -> logging.Handler | None:
    return next((h for h in logging.getLogger("damoc").handlers if getattr(h, "_damoc", False)), None)


def setup_logging(level: int = logging.INFO) -> None:
    """DaMoC's own lines on the terminal (INFO; DEBUG, with tracebacks, under -v)."""
    root = logging.getLogger("damoc")
    root.setLevel(logging.DEBUG)  # the run's log file takes everything; the terminal handler filters
    handler = terminal_handler()
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(RedactSecrets())
        handler._damoc = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setLevel(level)
    root.propagate = False


def log_to_file(path: Path) -> logging.Handler:
    """Also write damoc's log to `path` (the run directory's log, DEBUG and tracebacks), redacted the same way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactSecrets())
    logging.getLogger("damoc").addHandler(handler)
    return handler


class QuietTerminal:
    """Everything the libraries print (Ray's and Tune's tables and paths, worker output, warnings,
    DeepSpeed's notices, progress bars) goes to a file in the run's logs; the terminal keeps DaMoC's own
    lines and what the command prints. At the file-descriptor level, so processes started meanwhile (the
    embedded Ray cluster and its workers) write there too."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> QuietTerminal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        self.stdout = open(os.dup(self.saved[0]), "w", buffering=1, encoding="utf-8", closefd=True)
        self.stderr = open(os.dup(self.saved[1]), "w", buffering=1, encoding="utf-8", closefd=True)
        self.file = open(self.path, "a", encoding="utf-8")
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        self.handler = terminal_handler()
        if self.handler is not None:
            self.old_stream = self.handler.setStream(self.stderr)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        if self.handler is not None:
            self.handler.setStream(self.old_stream)
        for f in (self.stdout, self.stderr, self.file):
            f.close()
        for fd in self.saved:
            os.close(fd)
