"""The peer tier: cache workers and mounts sharing chunks over a consistent-hash ring.

`ring` and `protocol` are pure (no I/O, no trio); the client and server modules
hold the network half.
"""
