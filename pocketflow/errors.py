"""One exception type for every problem the user can fix; the CLI prints it as one line."""


class PocketFlowError(Exception):
    """A user-facing error: its message is the whole story (no traceback needed)."""


class ConfigError(PocketFlowError):
    """Invalid configuration: the message names the file and the dotted key."""


class TrialFailed(PocketFlowError):
    """A single search trial failed (e.g. NaN loss); the search records it and continues."""
