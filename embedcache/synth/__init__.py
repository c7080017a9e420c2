"""synth: CT that embedcache paints itself, so every command runs with no data set at hand.

:mod:`~embedcache.synth.phantom` paints a synthetic abdomen with adrenal glands (``embedcache phantom``, the default
data of the tests and the demo); :mod:`~embedcache.synth.anatomy` paints CT around real label maps (``phantom
--anatomy``, the realistic bed the recipes are chosen on). Both write FLARE22's layout and a ``dataset.json``
through :mod:`embedcache.io`; neither reads a model. Contract: the same seed gives the same files.
"""
