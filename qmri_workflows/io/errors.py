"""Exceptions of the input layer."""


class BIDSInputError(ValueError):
    """The input dataset cannot be used as it is.

    The message names the offending file(s) and says how to fix them, so the command line can print
    it as is (BIDS-Apps exit code 66/"missing input" or similar).
    """
