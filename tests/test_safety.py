"""Nothing lost, nothing silently wrong (issue 15): atomic saves, verified loads, safe checkpoints,
rollback of in-place changes, and errors that name the bad file, layer or batch."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import autorank
from tests.tiny_models import MLP, build

REPO = Path(autorank.__file__).resolve().parent.parent


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _saved(tmp_path, budget=0.5, seed=0):
    model, x = build("mlp", seed=seed)
    result = autorank.optimize(model, budget, x)
    folder = result.save(tmp_path / "saved")
    return result, x, folder


# ---- 1. a failed save leaves the previous save loadable ------------------------------------------------

def test_a_save_that_fails_while_writing_leaves_the_previous_save_loadable(tmp_path):
    first, x, folder = _saved(tmp_path)
    expected = _outputs(first.model, x)
    second = autorank.optimize(build("mlp", seed=7)[0], 0.5, x).save(tmp_path / "second")
    script = textwrap.dedent(f"""
        import resource, signal, autorank
        from tests.tiny_models import MLP
        model, plan = autorank.load({str(second)!r}, MLP()), autorank.load_plan({str(second)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            autorank.save(model, plan, {str(folder)!r})
        except OSError as exc:
            print("FAILED:", exc)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "FAILED:" in proc.stdout, proc.stdout + proc.stderr
    assert "the files there are as they were before this save" in proc.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "plan.json"]  # no temporary left
    loaded = autorank.load(folder, MLP())
    assert torch.equal(_outputs(loaded, x), expected)


# ---- 2. a checkpoint belongs to one model ----------------------------------------------------------------

def test_a_checkpoint_of_another_model_with_the_same_architecture_is_refused(tmp_path):
    model, x = build("mlp")
    ckpt = autorank.Retrain(checkpoint=str(tmp_path / "ckpt"))
    first = autorank.optimize(model, 0.5, x, retrain=ckpt)
    again = autorank.optimize(model, 0.5, x, retrain=ckpt)  # the same model resumes
    assert torch.equal(_outputs(again.model, x), _outputs(first.model, x))
    other, _ = build("mlp", seed=1)
    mine = autorank.retrain.model_fingerprint(model)
    theirs = autorank.retrain.model_fingerprint(other)
    assert mine["architecture"] == theirs["architecture"] and mine["weights"] != theirs["weights"]
    with pytest.raises(ValueError, match="written for another model \\(its weights differ\\)") as err:
        autorank.optimize(other, 0.5, x, retrain=ckpt)
    msg = str(err.value)
    assert mine["weights"] in msg and theirs["weights"] in msg and "to start afresh" in msg


# ---- 3. corrupted weights are detected ---------------------------------------------------------------------

def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_flipped_bytes_and_nans_in_the_weights_file_are_errors_naming_it(tmp_path):
    result, x, folder = _saved(tmp_path)
    wfile = folder / "model.safetensors"
    record = json.loads((folder / "plan.json").read_text())["weights"]
    assert record["sha256"] == autorank.io.file_sha256(wfile) and record["bytes"] == wfile.stat().st_size
    good = wfile.read_bytes()
    start = _data_start(wfile)
    flipped = bytearray(good)
    for i in range(start + 64, start + 96):
        flipped[i] ^= 0xFF
    wfile.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="model.safetensors' is corrupted or from another save: its SHA-256"):
        autorank.load(folder, MLP())
    autorank.load(folder, MLP(), verify=False)  # the documented opt-out reads it as it is
    nans = bytearray(good)
    nans[start:start + 32] = b"\x00\x00\xc0\x7f" * 8  # float32 NaN
    wfile.write_bytes(bytes(nans))
    with pytest.raises(ValueError, match="SHA-256"):
        autorank.load(folder, MLP())
    with pytest.raises(ValueError, match=r"model.safetensors': tensor '.*' holds NaN values"):
        autorank.load(folder, MLP(), verify=False)
    wfile.write_bytes(good)
    assert torch.equal(_outputs(autorank.load(folder, MLP()), x), _outputs(result.model, x))


# ---- 4. a forward that reads a child's weight ----------------------------------------------------------------

class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x))))) + self.head.weight.sum()


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_a_layer_whose_weight_the_forward_reads_stays_dense_with_the_reason(inplace):
    torch.manual_seed(0)
    model, x = ReadsWeight().eval(), torch.randn(4, 32)
    result = autorank.optimize(model, 0.6, x, inplace=inplace)
    assert "reads its .weight directly" in result.plan.skipped["head"]
    assert "head" not in result.plan.layers and result.plan.layers["fc1"].compressed
    assert isinstance(result.model.head, nn.Linear)
    _outputs(result.model, x)  # runs
    assert (result.model is model) == inplace


class FailsWhenCompressed(MLP):
    """Runs dense, fails once fc1 is factorised: the failure comes after realising."""

    def forward(self, x):
        if not isinstance(self.fc1, nn.Linear):
            raise RuntimeError("this model only runs with its own nn.Linear")
        return super().forward(x)


def test_a_failure_after_realising_leaves_an_inplace_model_as_it_was():
    torch.manual_seed(0)
    model, x = FailsWhenCompressed().eval(), torch.randn(4, 32)
    before = {n: m for n, m in model.named_modules()}
    expected = _outputs(model, x)
    with pytest.raises(RuntimeError, match="only runs with its own nn.Linear"):
        autorank.optimize(model, 0.4, x, inplace=True)
    assert {n: m for n, m in model.named_modules()} == before  # the very same modules, none factorised
    assert torch.equal(_outputs(model, x), expected)


# ---- 5. a failed load(inplace=True) leaves the model as it was --------------------------------------------------

class WiderMLP(MLP):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 80)
        self.fc2 = nn.Linear(80, 48)


def test_a_failed_inplace_load_leaves_the_model_as_it_was(tmp_path):
    _, x, folder = _saved(tmp_path)
    torch.manual_seed(3)
    model = WiderMLP().eval()
    before = {n: m for n, m in model.named_modules()}
    expected = _outputs(model, x)
    with pytest.raises(ValueError, match="do not fit this model with the saved plan: shapes differ"):
        autorank.load(folder, model, inplace=True)
    assert {n: m for n, m in model.named_modules()} == before
    assert torch.equal(_outputs(model, x), expected)


# ---- 6. a crafted checkpoint cannot run code ----------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_crafted_rng_state_in_a_checkpoint_is_refused_without_running_it(tmp_path):
    model, x = build("mlp")
    ckpt = autorank.Retrain(checkpoint=str(tmp_path / "ckpt"))
    autorank.optimize(model, 0.5, x, retrain=ckpt)
    marker = tmp_path / "pwned"
    with open(tmp_path / "ckpt" / "rng_state.pt", "wb") as f:
        pickle.dump(_Payload(marker), f, protocol=2)
    with pytest.raises(ValueError, match="rng_state.pt' is not a saved RNG state"):
        autorank.optimize(model, 0.5, x, retrain=ckpt)
    assert not marker.exists()


# ---- 7. NaN or Inf in a weight or a calibration batch --------------------------------------------------------------

@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (float("inf"), "Inf")], ids=["nan", "inf"])
def test_a_non_finite_weight_is_an_error_naming_the_layer(value, what):
    model, x = build("mlp")
    with torch.no_grad():
        model.fc2.weight[3, 5] = value
    with pytest.raises(ValueError, match=f"layer 'fc2' holds {what} values in its parameter 'fc2.weight'"):
        autorank.optimize(model, 0.5, x)


@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (float("-inf"), "Inf")], ids=["nan", "inf"])
def test_a_non_finite_calibration_batch_is_an_error_naming_it(value, what):
    model, x = build("mlp")
    bad = torch.randn(4, 32)
    bad[1, 2] = value
    with pytest.raises(ValueError, match=f"calibration batch 1 holds {what} values"):
        autorank.optimize(model, 0.5, x, calibration=[torch.randn(4, 32), bad])


# ---- 9. unreadable files are errors naming the file ------------------------------------------------------------------

@pytest.mark.parametrize("text,msg", [
    ("{not json", "is not JSON"),
    ("", "is empty"),
    ("[1, 2]", "holds a JSON array, not an autorank plan"),
    (json.dumps({"version": 1, "layers": {"fc1": {}}}), "'layers' must be a list of layer records, got a JSON object"),
    (json.dumps({"version": 1, "layers": [{"kind": "linear"}]}), "layer record 0 has no 'name'"),
    (json.dumps({"version": 1, "layers": [{"name": "fc1"}]}), "is not a valid autorank plan"),
], ids=["not-json", "empty", "array", "layers-dict", "no-name", "fields-missing"])
def test_an_unreadable_plan_is_an_error_naming_the_file(tmp_path, text, msg):
    (tmp_path / "plan.json").write_text(text)
    with pytest.raises(ValueError, match=msg) as err:
        autorank.load(tmp_path, MLP())
    assert str(tmp_path / "plan.json") in str(err.value)


def test_a_truncated_or_missing_weights_file_is_an_error_naming_it(tmp_path):
    _, _, folder = _saved(tmp_path)
    wfile = folder / "model.safetensors"
    good = wfile.read_bytes()
    wfile.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match="model.safetensors' has .* bytes, but plan.json recorded"):
        autorank.load(folder, MLP())
    with pytest.raises(ValueError, match="model.safetensors' is not a readable safetensors file"):
        autorank.load(folder, MLP(), verify=False)
    wfile.write_bytes(good[:5])
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        autorank.load(folder, MLP(), verify=False)
    wfile.unlink()
    wfile.mkdir()
    with pytest.raises(ValueError, match="model.safetensors' is a directory"):
        autorank.load(folder, MLP())


# ---- 10. models deepcopy refuses -----------------------------------------------------------------------------------------

class Locked(MLP):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


def test_a_model_that_cannot_be_copied_says_what_failed_and_what_to_do():
    torch.manual_seed(0)
    model, x = Locked().eval(), torch.randn(4, 32)
    with pytest.raises(TypeError, match="copy.deepcopy of the Locked failed .*lock.*pass inplace=True"):
        autorank.optimize(model, 0.5, x)
    result = autorank.optimize(model, 0.5, x, inplace=True)
    assert result.model is model and result.plan.layers["fc1"].compressed


def test_a_pruned_linear_is_compressed_from_its_effective_weight():
    from torch.nn.utils import prune
    model, x = build("mlp")
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    expected = _outputs(model, x)
    effective = (model.fc1.weight_orig * model.fc1.weight_mask).detach()
    result = autorank.optimize(model, 0.5, x, compression=autorank.Compression(families=["alds"]))
    lp = result.plan.layers["fc1"]
    assert lp.compressed
    dense = result.model.fc1.to_dense().weight.detach()
    measured = torch.linalg.matrix_norm(dense - effective, 2) / torch.linalg.matrix_norm(effective, 2)
    assert float(measured) == pytest.approx(lp.error, rel=1e-3)  # the error is that of weight_orig * mask
    assert hasattr(model.fc1, "weight_orig") and torch.equal(_outputs(model, x), expected)  # caller's untouched


# ---- 11. the small ones -------------------------------------------------------------------------------------------------

def test_all_zero_calibration_data_warns(caplog):
    model, x = build("mlp")
    with caplog.at_level(logging.WARNING, logger="autorank"):
        autorank.optimize(model, 0.5, x, calibration=[torch.zeros(4, 32)] * 2)
    assert "calibration inputs of 1 layer(s) are all zero (fc1)" in caplog.text


def test_conv3d_and_transposed_convolutions_are_left_dense_with_a_reason():
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Flatten(), nn.Unflatten(1, (8, 8, 8)),
                          nn.ConvTranspose2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 10 * 10, 32), nn.Linear(32, 8))
    result = autorank.optimize(model, 0.6, torch.randn(2, 2, 4, 10, 10))
    assert "no family factorises 3-D convolutions" in result.plan.skipped["0"]
    assert "ConvTranspose2d: transposed convolutions are not supported" in result.plan.skipped["3"]


@pytest.mark.parametrize("calibrated", [False, True], ids=["weights", "data"])
def test_optimize_does_not_move_the_global_rng(calibrated):
    model, x = build("residual_cnn")
    batches = [torch.randn_like(x) for _ in range(2)] if calibrated else None
    state = torch.random.get_rng_state()
    autorank.optimize(model, 0.5, x, calibration=batches)
    assert torch.equal(torch.random.get_rng_state(), state)


# ---- 16.6: a compressed Hugging Face model loads from its config, without the dense weights -----------------------------

def test_a_compressed_llama_loads_from_its_config_on_meta_bit_identically(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 96, (2, 12))
    result = autorank.optimize(model, 0.6, {"input_ids": ids})
    result.save(tmp_path / "llama")
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    loaded = autorank.load(tmp_path / "llama", skeleton).eval()
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    assert all(p.is_meta for p in skeleton.parameters())  # the skeleton itself was not touched
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    assert autorank.count_params(loaded) == result.plan.totals["params"]
