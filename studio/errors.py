"""Errors the studio reports to users as one actionable line (no traceback)."""


class UserError(Exception):
    """Bad input from the user: the message says what was wrong and what to do."""
