"""Error types shared by the command line and the command modules (a module of its own, so that
``w2v2.cli`` and ``w2v2.commands`` need not import each other)."""


class UserError(Exception):
    """An error caused by input the user can fix: printed as one line, no traceback."""


class UsageError(UserError):
    """Arguments that cannot work together: one line, exit status 2 (as argparse's own errors)."""

    exit_status = 2
