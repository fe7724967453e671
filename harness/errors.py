"""The two kinds of failure the harness reports as one line instead of a traceback."""


class HarnessError(Exception):
    """Bad input from the user (unknown implementation, malformed case, impossible shape, bad labels).

    The command line prints ``error: <message>`` and exits with status 2.
    """


class UnsupportedCase(Exception):
    """An implementation cannot run this case here; the message says why.

    This is a statement about the implementation (missing option, missing GPU, missing package),
    never a numerical failure.
    """
