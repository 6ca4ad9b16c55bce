"""Server logs as text or JSON lines, each line about a request carrying its generation_id.

The service sets `generation_id` (a context variable) while it handles a request, so every
line logged in that task, or in threads it starts with asyncio.to_thread (which copies the
context), carries it without passing it around. The batcher sets `generation_ids` while a
batch of several generations runs.
"""
from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar

generation_id: ContextVar[str] = ContextVar("generation_id", default="")
generation_ids: ContextVar[tuple[str, ...]] = ContextVar("generation_ids", default=())

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"


class RequestContextFilter(logging.Filter):
    """Copies the request's ids onto each record (a handler filter: it sees every logger's records)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "generation_id", ""):
            record.generation_id = generation_id.get()
        if not getattr(record, "generation_ids", ()):
            record.generation_ids = generation_ids.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "generation_id", ""):
            line["generation_id"] = record.generation_id
        if getattr(record, "generation_ids", ()):
            line["generation_ids"] = list(record.generation_ids)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if getattr(record, "generation_id", ""):
            text += f" [generation_id={record.generation_id}]"
        elif getattr(record, "generation_ids", ()):
            text += f" [generation_ids={','.join(record.generation_ids)}]"
        return text


def configure(log_format: str) -> None:
    """Give the root logger's handlers (cli.main's basicConfig) the chosen format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not '{log_format}'")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
        if not any(isinstance(f, RequestContextFilter) for f in handler.filters):
            handler.addFilter(RequestContextFilter())
