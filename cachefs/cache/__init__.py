"""Chunk cache tiers: MEM (`mem.py`) and SSD (`disk.py`). Every tier stores whole
chunks under the 16-byte digest of `cachefs.objects.chunk_digest`."""
