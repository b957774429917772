"""The one exception a user can cause: the CLI turns it into one line on stderr and exit code 2."""


class LucaError(Exception):
    """Bad path, bad file, bad config or bad request; the message names the place."""
