"""Errors the studio reports to users as one actionable line (no traceback).

UserError is defined in pipelines (the lower layer) so both layers raise the same type.
"""

from pipelines.errors import UserError

__all__ = ["UserError"]
