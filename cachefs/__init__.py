"""cachefs: a FUSE caching filesystem with a distributed peer cache."""

__version__ = "0.1.0"
