"""The one exception type for user mistakes: scripts print its message on one line and exit non-zero."""


class UserError(Exception):
    """A problem with the user's input (arguments, data, checkpoints) that they can fix.

    The message says what is wrong and how to fix it; scripts print it without a traceback.
    """
