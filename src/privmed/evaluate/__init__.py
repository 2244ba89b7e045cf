"""Secure multi-site validation: does a model behave the same when run securely?

Modules, in dependency order (each uses only those above it):

- ``roc``          AUROC, DeLong CI and the paired DeLong test (Sun & Xu 2014 midranks); ROC points.
- ``equivalence``  secure vs plaintext outputs: two-sample KS, paired TOST, |difference|,
                   label agreement, Bland-Altman limits.
- ``masks``        Dice and 95% Hausdorff distance of binary masks (with voxel spacing).
- ``costs``        per-image cost summaries (median, IQR, max) and study-time projection.
- ``store``        SQLite results database, one row per image, written as each image finishes.
- ``runner``       ``run_validation``: preprocess, onnxruntime, secure session, store; resume.
- ``analysis``     stored rows -> every number of the report (per finding, per site, pooled).
- ``plots``        ROC grid, secure-vs-plaintext scatter, Bland-Altman, as base64 PNG.
- ``report``       ``build_report``: self-contained ``report.html`` and ``summary.json``.

The CLI (``privmed validate`` / ``privmed report``) is ``privmed.cli.validate``.
"""
