"""The one error type a user sees: the command line prints its message as a single line and exits non-zero."""


class NanoError(Exception):
    """Bad input or a failed stage, with a message that says what and why."""
