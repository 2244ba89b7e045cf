"""Gradient-inversion attacks on federated updates, and their scoring (``privmed attack``).

Modules in dependency order (each imports only those above it, plus ``privmed.federated``
for the site update and the study loader, and ``privmed.models`` for the networks):

- ``metrics``     MSE, PSNR, SSIM (Wang et al. 2004; checked against scikit-image), the
                  prior-relative leakage score, Hungarian matching of reconstructions.
- ``grid``        PNG grids: ground truth | reconstruction, pixels as scored.
- ``updates``     what a site sends (``privmed federate``'s ``client_update``, DP-SGD
                  included), the secure aggregate, and the attacker's differentiable replica.
- ``labels``      label counts from the head-bias update (iDLG at batch 1; batch restoration
                  in the spirit of Yin et al. 2021), and label assignment per restart.
- ``invert``      "Inverting Gradients" (Geiping et al. 2020): cosine objective + TV prior,
                  signed Adam, coarse-to-fine, restarts; the attacker's ``ImagePrior``.
- ``targets``     attacked images and the prior from a study, preprocessed as sites do.
- ``experiment``  one attack per configuration (batch x DP sigma x sites), ``attack.json``.
- ``report``      leakage curves beside the AUROC cost of each defence; MD + HTML report.

User documentation: ``docs/attacks.md``.
"""
