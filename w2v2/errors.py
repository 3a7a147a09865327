"""Error types shared by the command line and the command modules (a module of its own, so that
``w2v2.cli`` and ``w2v2.commands`` need not import each other)."""


class UserError(Exception):
    """An error caused by input the user can fix: printed as one line, no traceback."""
