"""Secure multi-site validation: does a model behave the same when run securely?

Modules, in dependency order (each uses only those above it):

- ``roc``          AUROC, DeLong CI and the paired DeLong test (Sun & Xu 2014 midranks); ROC points.
- ``equivalence``  secure vs plaintext outputs: two-sample KS, paired TOST, |difference|,
                   label agreement, Bland-Altman limits.
- ``masks``        Dice and 95% Hausdorff distance of binary masks (with voxel spacing).
- ``costs``        one image's share of a multi-image secure session; per-image cost summaries
                   (median, IQR, max) and study-time projection.
- ``store``        SQLite results database, one row per image, written as each image finishes.
- ``study``        the model (onnxruntime), its preprocessing and the study's records; one image
                   preprocessed and run in clear.
- ``runner``       ``run_validation``: groups of images, one secure session per group (one per
                   image if the group's fails), store; resume.
- ``analysis``     stored rows -> every number of the report (per finding, per site, pooled).
- ``plots``        ROC grid, secure-vs-plaintext scatter, Bland-Altman, as base64 PNG.
- ``report``       ``build_report``: self-contained ``report.html`` and ``summary.json``.

The CLI (``privmed validate`` / ``privmed report``) is ``privmed.cli.validate``.
"""
