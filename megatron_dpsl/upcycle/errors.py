"""Errors the upcycler raises for bad input; the CLI prints them without a traceback."""


class UpcycleError(ValueError):
    """Bad source checkpoint or option; the message names the flag/path and what is allowed."""
