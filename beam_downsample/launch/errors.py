"""Errors of the launcher."""


class UsageError(ValueError):
    """A command-line problem: one line naming the option, exit status 2."""
