"""sse-relay: a Redis-backed, horizontally scalable Server-Sent Events relay."""

from .app import create_app
from .config import Settings
from .relay import Relay
from .version import __version__

__all__ = ["Relay", "Settings", "__version__", "create_app"]
