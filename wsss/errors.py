"""The exception types the CLI turns into one line: user errors, and interruptions."""


class WsssError(Exception):
    """A problem with the user's input (path, file name, checkpoint, data), not a bug.

    The CLI catches it, prints ``error: <message>`` and exits with status 1.
    """


class Stopped(WsssError):
    """A run that stopped on a problem in its data after saving some of its work. The CLI's line
    adds what was saved and the command that continues the run, as for an interruption."""


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM in a CLI run. Not a KeyboardInterrupt, which the CLI framework
    would swallow into a silent exit: the CLI catches this one and says what was saved."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code
