"""Errors that mean "the user gave us something we cannot use"."""


class UserError(Exception):
    """Bad input (path, file, flag value): the CLI prints it as one line and exits with status 2."""
