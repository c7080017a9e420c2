"""cache: phase one, the embedding cache: made once, checked whenever it is read.

:mod:`~embedcache.cache.encode` runs phase one top to bottom: the inputs checked, the plan
(:mod:`~embedcache.cache.plan`: what is done already, which slices hold a target label), the
pipeline (:mod:`~embedcache.cache.pipeline`: prepared slices → encoder → each case's shard), the
merge (:mod:`~embedcache.cache.merge`). Storage is apart from compute: :mod:`~embedcache.cache.store`
writes shards and reads caches, :mod:`~embedcache.cache.records` holds the :class:`Signature` and
the case records, checked on open; :mod:`~embedcache.cache.preprocess` holds the pure array
functions (window, resample). Contract: a case is complete only once all its rows are written and
synced; the cache file is only ever replaced whole; a cache made by another backbone, checkpoint,
preprocessing or label set is refused, another embedcache version is a warning.
"""
