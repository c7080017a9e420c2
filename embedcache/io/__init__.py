"""io: the only code that knows file formats.

NIfTI and DICOM series in (:mod:`~embedcache.io.volumes` is the one reader entry point, returning
volumes in the canonical ``(z, y, x)`` orientation that :mod:`~embedcache.io.geometry` fixes, with
the affine that maps them back), NIfTI masks out on the input's own grid, dataset layouts
(:mod:`~embedcache.io.datasets`: FLARE22 / nnU-Net folders), atomic writes and one-line write
errors (:mod:`~embedcache.io.files`), label maps: what the ids mean, FLARE22's and other data sets'
(:mod:`~embedcache.io.labels`), and DICOM Segmentation and RT Structure Set output (:mod:`~embedcache.io.dicom_out`).
Contract: DICOM pixel data become HU through rescale slope and intercept before anything else;
slices are ordered along the slice normal; every error names the file and the fix. No torch here.
"""
