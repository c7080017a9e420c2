"""embedcache: fine-tune Segment Anything's mask decoder on CT against cached image embeddings."""

__version__ = "0.1.0"
