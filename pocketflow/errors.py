"""One exception type for every problem the user can fix; the CLI prints it as one line."""


class PocketFlowError(Exception):
    """A user-facing error: its message is the whole story (no traceback needed)."""


class ConfigError(PocketFlowError):
    """Invalid configuration: the message names the file and the dotted key."""


class TrialFailed(PocketFlowError):
    """A single search trial failed (e.g. NaN loss); the search records it and continues."""


_STOP = {"requested": False}


def request_stop(signum=None, frame=None):
    """The SIGINT / SIGTERM handler: remember the stop, then raise KeyboardInterrupt where the
    program is. TensorFlow and Keras re-raise an exception raised inside code they trace or call
    back (a tf.function being traced, a Keras layer call) as an error of their own, so whoever
    catches an error must ask `stop_requested()` before calling it a bug."""
    _STOP["requested"] = True
    raise KeyboardInterrupt


def stop_requested() -> bool:
    return _STOP["requested"]


def reset_stop() -> None:
    _STOP["requested"] = False
