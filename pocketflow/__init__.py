"""PocketFlow: automated model compression for TensorFlow 2 / Keras 3.

The pipeline, in the order a reader meets it: config -> data/model -> learner ->
search -> export.
"""
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pocketflow.api import best, compress, evaluate, setup, train  # noqa: E402,F401
from pocketflow.config import load_config  # noqa: E402,F401
from pocketflow.errors import PocketFlowError  # noqa: E402,F401

__version__ = "0.1.0"
