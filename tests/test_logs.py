"""Secret values from the environment never reach damoc's log output."""

from __future__ import annotations

import logging

from damoc.logs import RedactSecrets, log_to_file, secret_values


def test_planted_token_is_redacted(tmp_path, monkeypatch):
    token = "hf_PlantedSecretValue1234567890"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to redact safely: ordinary words would go
    assert token in secret_values() and "abc" not in secret_values()
    handler = log_to_file(tmp_path / "damoc.log")
    logger = logging.getLogger("damoc.test")
    try:
        logger.setLevel(logging.INFO)
        logger.info("loading with token %s from %s", token, "env")
    finally:
        logging.getLogger("damoc").removeHandler(handler)
        handler.close()
    text = (tmp_path / "damoc.log").read_text()
    assert token not in text and "loading with token *** from env" in text


def test_filter_on_record_without_secrets():
    record = logging.LogRecord("damoc", logging.INFO, __file__, 1, "rows=%d", (3,), None)
    assert RedactSecrets(environ={}).filter(record) and record.getMessage() == "rows=3"
