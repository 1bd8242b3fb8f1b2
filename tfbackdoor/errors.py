"""The one exception type for errors a user can cause (bad spec, missing file, wrong shape...).

The CLI prints ``TfbdError`` messages on one line and exits with status 2; any other
exception is a bug and keeps its traceback.
"""


class TfbdError(Exception):
    """A user-caused error whose message names the item and the problem."""
