"""evaluation: how good it is, under the prompts people give.

The prompt protocols (:mod:`~embedcache.evaluation.protocols`: oracle, jitter, box3d, clicks) behind one
``Segment`` callable and one :class:`~embedcache.evaluation.segmenter.Segmenter`, so
:mod:`~embedcache.evaluation.score` (cached embeddings) and :mod:`embedcache.segment` (new CT, embeddings on the
fly) run the very same code;
:mod:`~embedcache.evaluation.evaluate` scores any folder of label volumes; FLARE22's metrics in
:mod:`~embedcache.evaluation.metrics`; one :class:`~embedcache.evaluation.report.Report` record
written by :mod:`~embedcache.evaluation.report` and shown by :mod:`~embedcache.evaluation.page`.
Contract: every number says which cases (held out or not), which prompts and which checkpoint.
"""
