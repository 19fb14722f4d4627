"""Applications built on autorank: the ``autorank`` command line and what it runs.

Nothing in the core library imports this package (``tests/test_layering.py`` checks
it), so ``import autorank`` stays light; each module here may pull in heavier
dependencies (matplotlib, transformers, mlxtend, ...) inside the functions that need them.

* :mod:`autorank.apps.cli` -- the ``autorank`` command: ``optimize``, ``sweep``, ``report``, ``plot``.
* :mod:`autorank.apps.models` -- model spec strings (``mnist_cnn``, ``torchvision:<name>``,
  ``pkg.module:fn``) resolved into a model and its example inputs.
* :mod:`autorank.apps.sweep` -- budget sweeps from a TOML config, with resumable results.
* :mod:`autorank.apps.plots` -- the figures of a sweep (matplotlib).
* :mod:`autorank.apps.zoo` -- real digits (MNIST, scikit-learn's 8x8) and the trained MNIST CNN.
* :mod:`autorank.apps.text` -- real text (docstrings), the MiniLM sentence encoder, tokenised batches.
"""
