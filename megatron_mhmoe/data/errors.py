"""The one exception type the data pipeline raises for bad user input."""
from __future__ import annotations


class DataError(ValueError):
    """Bad or inconsistent data given by the user.

    The message always names the offending file (or parameter) and says how to fix it, so the
    caller can print it as is instead of a numpy stack trace.
    """
