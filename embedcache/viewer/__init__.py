"""``embedcache annotate``'s window: napari layers and a dock widget over the interaction core
(:mod:`embedcache.segment.annotate`). Needs the napari extra (``pip install 'embedcache[napari]'``)."""
