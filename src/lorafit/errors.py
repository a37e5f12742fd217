"""The one exception type for mistakes a user can make (config, data, paths, shapes).

The CLI prints its message on one line and exits non-zero; the message names the file, key or row and
says how to fix it.
"""


class LorafitError(Exception):
    """A user-fixable error. ``str(err)`` is a single line: what is wrong, where, and the fix."""
