"""embedcache: fine-tune Segment Anything's mask decoder on CT against cached image embeddings."""

__version__ = "0.1.0"

#: FLARE22 label ids of the adrenal glands, the default targets.
RIGHT_ADRENAL = 7
LEFT_ADRENAL = 8
