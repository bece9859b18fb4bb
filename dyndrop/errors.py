"""The one exception type that means "the user asked for something we cannot do".

Command-line entry points print its message as a single line and exit with status 2; every other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user (option, file, parameter): the message says what is wrong and what to do."""
