"""Errors as an operator reads them: one line, never a traceback."""

from __future__ import annotations


def one_line(error: BaseException) -> str:
    """An exception as one readable line (its first line, with its type when bare)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text or type(error).__name__
