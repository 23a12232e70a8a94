"""The error type pipelines (and the studio above them) report to users as one actionable line."""


class UserError(Exception):
    """Bad input from the user: the message says what was wrong and what to do."""
