"""The image readers behind :mod:`meditok.data.reading`, one module per format.

- :mod:`.common`: shared aliases and constants (``SUPPORTED_FORMATS``, ``ROBUST_PERCENTILES``, ``AXIS_NAMES``),
  the decoded-pixels record, the NaN/Inf refusal and :func:`volume_slice`.
- :mod:`.detect`: format detection from a file's first bytes.
- :mod:`.pillow`: PNG (8/16-bit, RGBA, palette; CT slices as HU + 1024), JPEG, TIFF, BMP, GIF.
- :mod:`.dicom`: DICOM files, multi-frame files and series folders (pydicom).
- :mod:`.nifti`: NIfTI-1/2 .nii / .nii.gz (nibabel).
- :mod:`.intensity`: decoded pixels -> [-1, 1] (CT windows, full scale, robust min-max).
- :mod:`.dispatch`: :func:`read_image`, :func:`read_ct_hu`, :func:`read_volume`, choosing the reader.

Import the public functions from :mod:`meditok.data` (or :mod:`meditok.data.reading`, whose docstring
states the value conventions every reader follows); these modules are its implementation.
"""
