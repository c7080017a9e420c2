"""model: the SAM variants and what runs them.

The backbone registry (:mod:`~embedcache.model.backbones`: builder, input size, normalization,
weights and their sha256; nothing is downloaded), the frozen image encoder on a device behind one
``Encoder`` protocol (:mod:`~embedcache.model.encoder`) and the CPU engines that run it and the
decoder as exported graphs (:mod:`~embedcache.model.engines`, a module per job), the batched prompt encoder + mask decoder
(:mod:`~embedcache.model.decoder`: many images × many box prompts in one forward, tested equal to
segment-anything's per-image call), box prompts from masks (:mod:`~embedcache.model.prompts`,
``(x0, y0, x1, y1)`` pixel edges) and the DiceCE loss (:mod:`~embedcache.model.losses`).
"""

#: Every backbone's image embedding: 256 channels on a 64×64 grid (torch-free, so the cache reads it).
EMBEDDING_SHAPE = (256, 64, 64)
