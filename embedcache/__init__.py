"""embedcache: fine-tune Segment Anything's mask decoder on CT against cached image embeddings.

The subpackages follow the pipeline and import only downwards: ``io`` (file formats) → ``synth`` (the phantom
and CT painted around real label maps) → ``model`` (SAM variants) → ``cache`` (phase one: encode, store) →
``train`` (phase two: fine-tune) → ``evaluation`` (protocols, the segmenter, score, evaluate, report) →
``segment`` (predict on new CT) → ``cli``. ``config`` (the frozen settings of every phase) and ``errors`` are the
base every layer imports; ``runtime`` holds devices, torchrun and threads.
"""

__version__ = "0.1.0"
