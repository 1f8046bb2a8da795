"""The one exception type for errors a user can cause; the CLI prints it as one line."""


class WsssError(Exception):
    """A problem with the user's input (path, file name, checkpoint, data), not a bug.

    The CLI catches it, prints ``error: <message>`` and exits with status 1.
    """
