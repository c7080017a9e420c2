"""train: phase two, the mask decoder trained against the cache.

:func:`embedcache.train.finetune.finetune` is the entry (the checks before torch, the resume
policy), :mod:`~embedcache.train.loop` the loop to read top to bottom. Which case is in which set
lives in :mod:`~embedcache.train.cases` (the split, split files, the set score reports on); the
prompts and batches in :mod:`~embedcache.train.data`; the model and its optimizer step in
:mod:`~embedcache.train.trainer`; the run folder in :mod:`~embedcache.train.runs`, its checkpoint
schema in :mod:`~embedcache.train.checkpoint`; a trained decoder beside its backbone on a device,
and its export, in :mod:`~embedcache.train.decoders`. Contract: test cases are never trained on and
never choose the checkpoint; checkpoints are safetensors, nothing loaded runs code.
"""
