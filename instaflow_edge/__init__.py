"""instaflow-edge: one-step InstaFlow text-to-image models, trained, exported and validated for the edge."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("instaflow-edge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
