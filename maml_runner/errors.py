"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input: the message names the key, the value given and what is allowed.

    The CLI prints it as one line and exits with status 2, without a traceback (set
    ``MAML_RUNNER_TRACEBACK=1`` to see one).
    """
