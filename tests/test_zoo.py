"""Tests for autorank.apps.zoo: real-data loaders, the MNIST CNN, its cache, and accuracy()."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autorank.apps import zoo


def _rows(dataset: TensorDataset) -> set[bytes]:
    return {image.numpy().tobytes() for image in dataset.tensors[0]}


def test_load_mnist_shapes_dtypes_and_normalisation():
    train, test = zoo.load_mnist()
    (x_train, y_train), (x_test, y_test) = train.tensors, test.tensors
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert y_train.shape == (4000,) and y_test.shape == (1000,)
    assert set(y_train.tolist()) == set(range(10)) and set(y_test.tolist()) <= set(range(10))
    # [0, 1] pixels normalised with the usual MNIST mean and std
    assert x_train.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert x_train.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    assert abs(x_train.mean().item()) < 0.05 and abs(x_train.std().item() - 1) < 0.05


def test_load_mnist_split_is_disjoint_and_covers_everything():
    train, test = zoo.load_mnist(n_train=4000, n_test=1000)
    assert not _rows(train) & _rows(test)
    labels = torch.cat([train.tensors[1], test.tensors[1]])
    assert torch.bincount(labels).tolist() == [500] * 10  # all 5,000 digits, 500 per class


def test_load_mnist_is_deterministic_and_seeded():
    a_train, a_test = zoo.load_mnist(n_train=300, n_test=100, seed=3)
    b_train, b_test = zoo.load_mnist(n_train=300, n_test=100, seed=3)
    c_train, _ = zoo.load_mnist(n_train=300, n_test=100, seed=4)
    for a, b in zip(a_train.tensors + a_test.tensors, b_train.tensors + b_test.tensors):
        assert torch.equal(a, b)
    assert not torch.equal(a_train.tensors[1], c_train.tensors[1])
    # a smaller train split is a prefix of a larger one with the same seed
    big_train, _ = zoo.load_mnist(n_train=500, n_test=100, seed=3)
    assert torch.equal(big_train.tensors[0][:300], a_train.tensors[0])


BAD_SPLITS = [
    ("too-many", dict(n_train=4000, n_test=1001), ValueError, "n_train=4000 + n_test=1001 = 5001"),
    ("train-over-size", dict(n_train=5001, n_test=0), ValueError, "5001"),
    ("no-train", dict(n_train=0, n_test=10), ValueError, "n_train=0"),
    ("negative-test", dict(n_train=10, n_test=-1), ValueError, "n_test=-1"),
    ("negative-seed", dict(seed=-1), ValueError, "seed=-1"),
    ("float-train", dict(n_train=100.0), TypeError, "100.0"),
    ("bool-test", dict(n_test=True), TypeError, "True"),
]


@pytest.mark.parametrize(
    "kwargs, exc, message", [c[1:] for c in BAD_SPLITS], ids=[c[0] for c in BAD_SPLITS]
)
def test_load_mnist_bad_split_sizes(kwargs, exc, message):
    with pytest.raises(exc) as info:
        zoo.load_mnist(**kwargs)
    assert message in str(info.value)
    assert "load_mnist" in str(info.value)


def test_load_digits():
    train, test = zoo.load_digits()
    assert train.tensors[0].shape == (1500, 1, 8, 8) and test.tensors[0].shape == (297, 1, 8, 8)
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    assert not _rows(train) & _rows(test)
    assert abs(torch.cat([train.tensors[0], test.tensors[0]]).mean().item()) < 1e-3
    with pytest.raises(ValueError, match="1797"):
        zoo.load_digits(n_train=1500, n_test=298)


def test_mnist_cnn_shape_and_size():
    model = zoo.mnist_cnn()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 400_000
    assert zoo.mnist_cnn(num_classes=4)(torch.zeros(1, 1, 28, 28)).shape == (1, 4)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        zoo.mnist_cnn(num_classes=0)


class _Fixed(nn.Module):
    """Predicts class 0 in eval mode and class 1 in train mode."""

    def forward(self, x):
        logits = torch.zeros(len(x), 2)
        logits[:, 0 if not self.training else 1] = 1.0
        return logits


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_accuracy_uses_eval_mode_and_restores_it(training):
    model = _Fixed().train(training)
    data = TensorDataset(torch.zeros(8, 3), torch.tensor([0, 0, 0, 1, 0, 1, 0, 0]))
    assert zoo.accuracy(model, data, batch_size=3) == pytest.approx(75.0)
    assert model.training is training


def test_accuracy_on_batches_and_bad_input():
    model = _Fixed().eval()
    batches = [(torch.zeros(2, 3), torch.tensor([0, 1])), (torch.zeros(2, 3), torch.tensor([1, 1]))]
    assert zoo.accuracy(model, batches) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="no samples"):
        zoo.accuracy(model, [])
    with pytest.raises(ValueError, match="batch_size"):
        zoo.accuracy(model, batches, batch_size=0)
    with pytest.raises(TypeError, match="int"):
        zoo.accuracy(model, 5)


def test_train_mnist_cnn_caches_by_config(tmp_path, monkeypatch):
    """Fast check of the cache logic on a 200-digit subset."""
    real_load = zoo.load_mnist
    monkeypatch.setattr(zoo, "load_mnist", lambda **kw: tuple(
        TensorDataset(*(t[:100] for t in d.tensors)) for d in real_load(**kw)
    ))
    first = zoo.train_mnist_cnn(cache_dir=tmp_path, epochs=1, seed=0)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["mnist_cnn-v1-n4000-e1-s0.safetensors"]
    assert not first.training

    def no_training(*args, **kwargs):
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(zoo, "Finetune", no_training)
    again = zoo.train_mnist_cnn(cache_dir=tmp_path, epochs=1, seed=0)
    assert not again.training
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(AssertionError, match="cache"):
        zoo.train_mnist_cnn(cache_dir=tmp_path, epochs=2, seed=0)  # new config retrains
    with pytest.raises(AssertionError, match="cache"):
        zoo.train_mnist_cnn(cache_dir=tmp_path, epochs=1, seed=0, force=True)


def test_train_mnist_cnn_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="epochs must be a positive int, got 0"):
        zoo.train_mnist_cnn(cache_dir=tmp_path, epochs=0)
    with pytest.raises(ValueError, match="seed"):
        zoo.train_mnist_cnn(cache_dir=tmp_path, seed=-1)


@pytest.mark.slow
def test_train_mnist_cnn_reaches_97_percent(tmp_path):
    model = zoo.train_mnist_cnn(cache_dir=tmp_path)
    _, test = zoo.load_mnist()
    assert zoo.accuracy(model, test) >= 97.0
    assert not model.training
    cached = zoo.train_mnist_cnn(cache_dir=tmp_path)
    assert zoo.accuracy(cached, test) == zoo.accuracy(model, test)
