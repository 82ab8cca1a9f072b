"""sse-relay: a Redis-backed, horizontally scalable Server-Sent Events relay."""

from .app import create_app
from .config import Settings
from .relay import Relay

__all__ = ["Relay", "Settings", "create_app"]
__version__ = "0.1.0"
