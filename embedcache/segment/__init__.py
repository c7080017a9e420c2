"""segment: segmenting new CT with a decoder, as a person uses it.

:mod:`~embedcache.segment.predict` encodes a new volume's slices on the fly and segments them from box prompts:
a JSON file of boxes and clicks (:mod:`~embedcache.segment.prompt_file`) or the glands of a label volume, through
the very protocols and :class:`~embedcache.evaluation.segmenter.Segmenter` that ``score`` measures, and writes
label volumes, DICOM Segmentations or RT Structure Sets on the input's own grid. :mod:`~embedcache.segment.annotate`
is the core a viewer drives: a person's box and clicks, one step at a time, through the same code. Contract: nothing
is written over a file it did not make, and an input that fails is reported while the rest go on.
"""
