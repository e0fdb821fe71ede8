"""cachefs: a FUSE caching filesystem with a distributed peer cache.

The Python API (docs/python.md): `cachefs.mount(...)` returns a `Mount`, a context
manager that always unmounts, with `add_dataset`, `remove_dataset`, `datasets`,
`status`, `refresh` and `residency`.
"""

__version__ = "0.1.0"

_API = ("mount", "Mount", "NodeStatus", "TierStatus", "DatasetStatus", "PeerStatus", "Residency")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    # Imported on first use: `cachefs --version` and the layers that import
    # cachefs.objects need none of it.
    if name in _API:
        from cachefs import api

        return getattr(api, name)
    raise AttributeError(f"module 'cachefs' has no attribute {name!r}")
