"""FoldServe's training side (needs torch): data -> zoo -> train -> fold -> export.

One module (or package) per stage, each using only the ones before it:

1. ``data``: datasets as seeded train/val/test splits of raw features.
2. ``zoo``: BN networks and their no-BN twins, standardization as the first layer
   (``batchnorm``: BN from its formula, the reference that folding reproduces).
3. ``train``: the training loop; a run directory (``model.pt``, ``config.json``,
   ``metrics.json``) holds the best-validation checkpoint.
4. ``fold``: ``fold_batchnorm`` folds eval-mode BN into neighbouring layers.
5. ``export``: folded and unfolded ONNX plus metadata as a model-repository
   version (``onnx_graph``: the torch -> ONNX step that keeps BN nodes).

Around the pipeline: ``__main__`` (the CLI), ``defaults`` (the models ``make run``
serves), ``retrain`` (the next version, trained with what the latest one recorded),
``server`` (asks a running server to load a version), ``bench_torch`` (eager
latency, folded vs unfolded) and ``experiments`` (BN's common claims tested
against the no-BN twins).
"""
