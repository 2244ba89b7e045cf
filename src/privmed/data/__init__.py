"""Medical-imaging data in clear, on the data owner's side: readers, layouts, preprocessing, synthetic studies.

Modules in dependency order (each imports only those above it; the one exception,
``datasets.load_study`` importing ``layouts`` inside the function, keeps the detectors apart):

- ``writers``    PNG, CR DICOM and NIfTI writers (deterministic bytes).
- ``synth_ct``   CT phantoms (HU volumes, lung/lesion masks) and MSD-style NIfTI studies.
- ``synth``      chest-radiograph phantoms with multi-label findings and per-site styles;
                 ChestX-ray14-style studies in PNG or DICOM; re-exports the CT generators.
- ``dicom_series`` which files of a folder form the series to read (SEG/SR/DICOMDIR left
                 out, several series refused by name or one picked by UID), ViewPosition.
- ``dicom_enhanced`` enhanced multi-frame CT/MR: per-frame rescale and geometry
                 (uses ``readers``' affine helper inside a function).
- ``readers``    ``read_image`` (DICOM, PNG/JPEG, .npy, NIfTI) -> (array, metadata),
                 ``read_dicom_series``, ``write_nifti``.
- ``dicom_make`` a CT series writer (patient/study/series/frame-of-reference modules) and
                 the InVesalius head CT reader.
- ``dicom_out``  DICOM SEG and TID 1500 SR writers and readers (highdicom).
- ``pseudonym``  keyed pseudonyms (HMAC-SHA256 with the data owner's key) for images.
- ``deid``       de-identified copies of DICOM folders (dicognito + PS3.15 basic profile).
- ``preprocess`` ``Preprocess``: the one preprocessing description stored next to a model
                 (``<model>.preprocess.json``); ``load_for_model``.
- ``labels``     label-table parsing: ChestX-ray14 pipe-separated findings, CheXpert columns
                 with an uncertain-label policy.
- ``datasets``   ``Record``, ``Study`` (records, findings, sites, skipped files),
                 ``load_study`` and the documented order of layout detection.
- ``layouts``    one detector per layout (MedMNIST, label tables, NIfTI pairs, site folders,
                 class folders, unlabelled images), called by ``load_study``.

Heavy readers (pydicom, nibabel, Pillow) are imported inside the functions that use them.
"""

from __future__ import annotations
