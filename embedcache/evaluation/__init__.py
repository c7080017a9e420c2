"""evaluation: how good it is, under the prompts people give, and segmenting new CT.

The prompt protocols (:mod:`~embedcache.evaluation.protocols`: oracle, jitter, box3d) behind one
``Segment`` callable, so :mod:`~embedcache.evaluation.score` (cached embeddings) and
:mod:`~embedcache.evaluation.predict` (embeddings on the fly, prompts from a label volume or a JSON
file: :mod:`~embedcache.evaluation.prompt_file`) run the very same code;
:mod:`~embedcache.evaluation.evaluate` scores any folder of label volumes; FLARE22's metrics in
:mod:`~embedcache.evaluation.metrics`; one :class:`~embedcache.evaluation.report.Report` record
written by :mod:`~embedcache.evaluation.report` and shown by :mod:`~embedcache.evaluation.page`.
Contract: every number says which cases (held out or not), which prompts and which checkpoint.
"""
