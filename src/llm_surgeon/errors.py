"""Errors that the command line turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: an unknown model, a missing file, an impossible setting.

    The CLI prints ``llm-surgeon: error: <message>`` and exits with status 2, no traceback.
    """
