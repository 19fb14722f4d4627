"""The convolution families: spatial SVD, Tucker-2 and CP (autorank.families.spatial / tucker / cp)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autorank
import autorank.families.cp  # noqa: F401  (registers "cp")
import autorank.families.spatial  # noqa: F401  (registers "spatial_svd")
import autorank.families.tucker  # noqa: F401  (registers "tucker2")
from autorank.config import CurveConfig
from autorank.measures import relative_data_error, relative_spectral_error
from autorank.families import get_family
from autorank.families.cp import cp_factors, cp_weight
from autorank.families.tucker import hooi, hosvd, tucker2_core, tucker2_weight, vbmf_ranks

FAMILIES = ["spatial_svd", "tucker2", "cp"]

# small grids and short ALS runs keep every test well under a second
OPTIONS = {"cp": {"max_rank": 12, "n_iter_max": 30}}

# (id, conv factory, input shape)
CASES = [
    ("3x3", lambda: nn.Conv2d(6, 8, 3), (2, 6, 7, 7)),
    ("3x5-stride-pad-dilation", lambda: nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
     (2, 4, 9, 11)),
    ("circular", lambda: nn.Conv2d(5, 4, 3, padding=1, padding_mode="circular"), (1, 5, 6, 6)),
    ("reflect-no-bias", lambda: nn.Conv2d(6, 5, 3, padding=(1, 1), padding_mode="reflect", bias=False),
     (2, 6, 5, 6)),
    ("stride2", lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1), (2, 8, 8, 8)),
    ("same", lambda: nn.Conv2d(4, 6, 3, padding="same"), (1, 4, 5, 5)),
]
CASE_IDS = [c[0] for c in CASES]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: a second intra-op thread only adds barriers on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    # pay the one-time imports (torch's flop counter, tensorly) before the timed tests
    autorank.count_flops(nn.Conv2d(1, 1, 1), torch.ones(1, 1, 1, 1))
    import tensorly.decomposition  # noqa: F401
    yield
    torch.set_num_threads(n)


def setup(case, family):
    _, make, shape = case
    torch.manual_seed(0)
    conv = make()
    x = torch.randn(*shape)
    info = autorank.analyze(nn.Sequential(conv), x).layers["0"]
    cfg = CurveConfig(families=(family,), grid_points=6, options=OPTIONS)
    return conv, x, info, cfg


def hyper_of(cand, i):
    return {k: int(v[i]) for k, v in cand.hyper.items()}


def some_rows(cand, k=4):
    return sorted(set(np.linspace(0, len(cand) - 1, k).round().astype(int).tolist()))


def weight_matrix(conv):
    return conv.weight.detach().reshape(conv.out_channels, -1)


def random_moment(conv, samples=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = conv.weight[0].numel()
    scale = torch.linspace(0.2, 2.0, n, dtype=torch.float64)[:, None]  # unequal input channels
    x = torch.randn(n, samples, generator=g, dtype=torch.float64) * scale
    return x @ x.T


def supported(case, family):
    conv = case[1]()
    return get_family(family).supports(conv, None)


def full_rank_hyper(family, conv):
    f, c, kh, kw = conv.weight.shape
    if family == "spatial_svd":
        return {"rank": min(c * kh, kw * f)}
    return {"rank_in": c, "rank_out": f}


# ---- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["spatial_svd", "tucker2"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_full_rank_is_exact(case, family):
    conv, x, _, _ = setup(case, family)
    new = get_family(family).realize(conv, full_rank_hyper(family, conv), None)
    dense = new.to_dense()
    assert dense.weight.shape == conv.weight.shape
    assert torch.allclose(dense.weight, conv.weight, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(new(x), conv(x), atol=1e-5)
        assert torch.allclose(dense(x), conv(x), atol=1e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=[CASE_IDS[0], CASE_IDS[1], CASE_IDS[3]])
def test_cp_recovers_a_kernel_of_cp_rank_r(case):
    conv, x, _, _ = setup(case, "cp")
    f, c, kh, kw = conv.weight.shape
    r = 3
    g = torch.Generator().manual_seed(3)
    factors = [torch.randn(n, r, generator=g) for n in (f, c, kh, kw)]
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("fr,cr,yr,xr->fcyx", *factors))
    new = get_family("cp").realize(conv, {"rank": r}, None)
    dense = new.to_dense()
    assert relative_spectral_error(weight_matrix(conv), weight_matrix(dense)) < 1e-5
    with torch.no_grad():
        assert torch.allclose(new(x), conv(x), atol=1e-4)


# ---- candidates: measured error, costs, realisation -----------------------------------------


@pytest.mark.parametrize("mode", ["weight", "data"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_measured_error_equals_predicted(case, family, mode):
    conv, x, info, cfg = setup(case, family)
    moment = random_moment(conv) if mode == "data" else None
    fam = get_family(family)
    cand = fam.candidates(conv, info, cfg, moment)
    assert len(cand) >= 3
    w = weight_matrix(conv)

    def built_error(hyper):
        new = fam.realize(conv, hyper, moment)
        approx = weight_matrix(new.to_dense())
        err = relative_spectral_error(w, approx) if moment is None else relative_data_error(w, approx, moment)
        return err, new

    if family != "tucker2":
        assert np.array_equal(cand.error, cand.error_lower)
    else:  # the candidate carries the truncated HOSVD's error; the build may refine it by HOOI
        assert np.all(cand.error_lower <= cand.error + 1e-12)
    for i in some_rows(cand):
        measured, new = built_error(hyper_of(cand, i))
        if family != "tucker2":
            assert measured == pytest.approx(cand.error[i], abs=1e-6), hyper_of(cand, i)
            continue
        assert measured == pytest.approx(new.fit_error, abs=1e-6)  # what the plan reports is what is built
        assert cand.error_lower[i] - 1e-6 <= measured <= cand.error[i] + 1e-6, hyper_of(cand, i)
        hosvd_only, _ = built_error({**hyper_of(cand, i), "hooi_iters": 0})
        assert hosvd_only == pytest.approx(cand.error[i], abs=1e-6), hyper_of(cand, i)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_costs_and_forward_of_every_candidate(case, family):
    conv, x, info, cfg = setup(case, family)
    fam = get_family(family)
    cand = fam.candidates(conv, info, cfg, None)
    for i in range(len(cand)):
        new = fam.realize(conv, hyper_of(cand, i), None)
        assert isinstance(new, autorank.modules.Factorized)
        assert cand.params[i] == sum(p.numel() for p in new.parameters()), hyper_of(cand, i)
        assert cand.flops[i] == autorank.count_flops(nn.Sequential(new), x), hyper_of(cand, i)
        dense = new.to_dense()
        assert (dense.stride, dense.padding, dense.dilation, dense.padding_mode) == \
            (conv.stride, tuple(conv.padding) if conv.padding != "same" else (1, 1), conv.dilation, conv.padding_mode)
        assert (dense.bias is None) == (conv.bias is None)
        with torch.no_grad():
            out, ref = new(x), dense(x)
        assert torch.allclose(out, ref, atol=1e-5 * (1 + ref.abs().max())), hyper_of(cand, i)


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_count_every_call(family):
    class Twice(nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x) + self.conv(x.flip(-1))

    torch.manual_seed(0)
    model = Twice(nn.Conv2d(4, 6, 3, stride=2, padding=1))
    x = torch.randn(2, 4, 7, 9)
    info = autorank.analyze(model, x).layers["conv"]
    assert info.calls == 2
    cfg = CurveConfig(families=(family,), grid_points=4, options=OPTIONS)
    fam = get_family(family)
    cand = fam.candidates(model.conv, info, cfg, None)
    for i in range(len(cand)):
        new = Twice(fam.realize(model.conv, hyper_of(cand, i), None))
        assert cand.flops[i] == autorank.count_flops(new, x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_skeleton_matches_realize(case, family):
    conv, x, info, cfg = setup(case, family)
    fam = get_family(family)
    cand = fam.candidates(conv, info, cfg, None)
    hyper = hyper_of(cand, len(cand) // 2)
    real, skel = fam.realize(conv, hyper, None), fam.skeleton(conv, hyper)
    assert type(skel) is type(real)
    assert {k: v.shape for k, v in skel.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    skel.load_state_dict(real.state_dict())
    with torch.no_grad():
        assert torch.equal(skel(x), real(x))


def test_spatial_errors_do_not_increase_with_rank():
    conv, _, info, _ = setup(CASES[0], "spatial_svd")
    cand = get_family("spatial_svd").candidates(conv, info, CurveConfig(families=("spatial_svd",)), None)
    assert np.all(np.diff(cand.hyper["rank"]) > 0)
    assert np.all(np.diff(cand.error) <= 1e-9)
    assert cand.error[0] > 0.1 and cand.error[-1] < 0.5 * cand.error[0]
    # ranks no cheaper than the dense layer (in parameters and in MACs) are never computed
    assert np.all((cand.params < info.dense_params) | (cand.flops < info.dense_flops))


@pytest.mark.parametrize("ranks", [(2, 3), (4, 2), (5, 7)])
def test_hooi_is_no_worse_than_hosvd(ranks):
    torch.manual_seed(0)
    w = nn.Conv2d(6, 8, 3).weight.detach().double()
    norm = w.norm()

    def frob(u_in, u_out):
        return float((w - tucker2_weight(u_in, tucker2_core(w, u_in, u_out), u_out)).norm() / norm)

    u_in, u_out = hosvd(w, *ranks)
    errs = [frob(u_in, u_out)] + [frob(*hooi(w, u_in, u_out, k)) for k in (1, 2, 5)]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]  # HOOI does move away from HOSVD on a random kernel


def test_tucker2_hooi_option_reaches_the_layer():
    conv, _, info, _ = setup(CASES[0], "tucker2")
    fam = get_family("tucker2")
    fit = {k: fam.candidates(conv, info, CurveConfig(families=("tucker2",), grid_points=4,
                                                     options={"tucker2": {"hooi_iters": k}}), None) for k in (0, 3)}
    assert set(fit[0].hyper["hooi_iters"]) == {0} and set(fit[3].hyper["hooi_iters"]) == {3}
    assert np.array_equal(fit[0].error, fit[3].error)  # both carry the closed-form HOSVD error
    refined = []
    for i in range(len(fit[3])):
        new = fam.realize(conv, hyper_of(fit[3], i), None)
        err = relative_spectral_error(weight_matrix(conv), weight_matrix(new.to_dense()))
        assert err == pytest.approx(new.fit_error, abs=1e-6) and err <= fit[3].error[i] + 1e-6
        refined.append(fit[3].error[i] - err)
    assert max(refined) > 1e-4  # HOOI is kept, and lowers the error, somewhere on a random kernel


def test_tucker2_vbmf_ranks():
    conv, _, info, _ = setup(CASES[4], "tucker2")
    fam = get_family("tucker2")
    pair = vbmf_ranks(conv.weight)
    assert all(r >= 1 for r in pair)
    only = fam.candidates(conv, info, CurveConfig(families=("tucker2",), options={"tucker2": {"ranks": "vbmf"}}),
                          None)
    assert len(only) == 1 and (only.hyper["rank_in"][0], only.hyper["rank_out"][0]) == pair
    both = fam.candidates(conv, info, CurveConfig(families=("tucker2",), options={"tucker2": {"ranks": "grid+vbmf"}}),
                          None)
    grid = fam.candidates(conv, info, CurveConfig(families=("tucker2",)), None)
    assert pair in set(zip(both.hyper["rank_in"].tolist(), both.hyper["rank_out"].tolist()))
    assert len(grid) <= len(both) <= len(grid) + 1


def test_tucker2_grid_keeps_balanced_pairs():
    conv, _, info, _ = setup(CASES[0], "tucker2")
    cand = get_family("tucker2").candidates(conv, info, CurveConfig(families=("tucker2",), grid_points=5), None)
    ratio = (cand.hyper["rank_in"] / 6) / (cand.hyper["rank_out"] / 8)
    assert np.all((ratio >= 0.5) & (ratio <= 2)) and len(cand) >= 5
    # the grid's pairs, less those no cheaper than the dense layer (the full pair (6, 8) among them)
    from autorank.families.tucker import tucker2_rankas_pairs

    r3, r4 = tucker2_rankas_pairs(6, 8, 5)
    kept = set(zip(cand.hyper["rank_in"].tolist(), cand.hyper["rank_out"].tolist()))
    assert kept <= set(zip(r3.tolist(), r4.tolist())) and (6, 8) not in kept and (4, 5) in kept
    assert np.all((cand.params < info.dense_params) | (cand.flops < info.dense_flops))


def test_cp_is_deterministic_and_leaves_tensorly_backend_alone():
    import tensorly as tl

    conv, _, info, cfg = setup(CASES[0], "cp")
    fam = get_family("cp")
    before = tl.get_backend()
    a = fam.candidates(conv, info, cfg, None)
    b = fam.candidates(conv, info, cfg, None)
    assert tl.get_backend() == before
    assert np.array_equal(a.error, b.error) and np.array_equal(a.hyper["iters"], b.hyper["iters"])
    hyper = hyper_of(a, len(a) - 1)
    s1, s2 = fam.realize(conv, hyper, None).state_dict(), fam.realize(conv, hyper, None).state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_cp_under_another_global_tensorly_backend():
    import tensorly as tl

    w = nn.Conv2d(4, 5, 3).weight
    ref = cp_factors(w, 3, n_iter_max=10, solver="tensorly")
    old = tl.get_backend()
    tl.set_backend("pytorch")
    try:
        fac = cp_factors(w, 3, n_iter_max=10, solver="tensorly")
        assert tl.get_backend() == "pytorch"
    finally:
        tl.set_backend(old)
    assert torch.equal(cp_weight(fac.out, fac.inp, fac.vertical, fac.horizontal),
                       cp_weight(ref.out, ref.inp, ref.vertical, ref.horizontal))


# (kernel shape, rank, tol): ranks below, at and above the channel counts; tol-stopped and full runs
ALS_CASES = [((12, 10, 3, 3), 3, 1e-7), ((12, 10, 3, 3), 12, 1e-7), ((12, 10, 3, 3), 40, 0.0),
             ((16, 8, 5, 3), 6, 1e-7), ((8, 8, 1, 3), 5, 1e-5), ((64, 32, 3, 3), 24, 1e-7)]


@pytest.mark.parametrize("shape, rank, tol", ALS_CASES)
def test_cp_als_is_tensorlys_parafac(shape, rank, tol):
    """The torch ALS runs tensorly's iteration: the same sweeps, the same kernel (up to rounding)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(rank))
    ours = cp_factors(w, rank, n_iter_max=60, tol=tol)
    ref = cp_factors(w, rank, n_iter_max=60, tol=tol, solver="tensorly")
    assert ours.iters == ref.iters
    k, k_ref = (cp_weight(f.out, f.inp, f.vertical, f.horizontal) for f in (ours, ref))
    assert float((k - k_ref).norm() / k_ref.norm()) < 1e-9
    if tol == 0.0:
        assert ours.iters == 60


def test_cp_als_error_record_is_the_fit_error():
    from autorank.families.cp import cp_als

    t = torch.randn(6, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    start = [torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) for n in t.shape]
    f, errors = cp_als(t, start, 25, 0.0)
    rebuilt = torch.einsum("ar,br,cr,dr->abcd", *f)
    assert len(errors) == 25
    assert errors[-1] == pytest.approx(float((t - rebuilt).norm() / t.norm()), rel=1e-9)
    assert errors[-1] <= errors[0] + 1e-12  # ALS never raises the least-squares error
    assert torch.equal(start[0], torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))


@pytest.mark.parametrize("solver, error", [("lbfgs", ValueError), (None, TypeError)])
def test_cp_rejects_a_bad_solver(solver, error):
    conv, _, info, _ = setup(CASES[0], "cp")
    cfg = CurveConfig(families=("cp",), options={"cp": {"solver": solver}})
    with pytest.raises(error, match=f"solver.*{solver!r}"):
        get_family("cp").candidates(conv, info, cfg, None)


def test_cp_with_tensorly_builds_what_it_planned():
    conv, _, info, _ = setup(CASES[0], "cp")
    cfg = CurveConfig(families=("cp",), options={"cp": {"solver": "tensorly"}})
    fam = get_family("cp")
    cand = fam.candidates(conv, info, cfg, None)
    hyper = hyper_of(cand, len(cand) - 1)
    assert hyper["tensorly"] == 1
    built = fam.realize(conv, hyper, None)
    assert relative_spectral_error(conv.weight.reshape(conv.out_channels, -1),
                                   built.to_dense().weight.reshape(conv.out_channels, -1)) == pytest.approx(
        float(cand.error[-1]), rel=1e-4, abs=1e-6)


def test_cp_skips_a_failed_fit(monkeypatch):
    import autorank.families.cp as cp

    real = cp.cp_factors

    def flaky(weight, rank, *args, **kwargs):
        if rank == 2:
            raise FloatingPointError("not finite")
        return real(weight, rank, *args, **kwargs)

    monkeypatch.setattr(cp, "cp_factors", flaky)
    conv, _, info, cfg = setup(CASES[0], "cp")
    cand = get_family("cp").candidates(conv, info, cfg, None)
    assert 2 not in cand.hyper["rank"].tolist() and 1 in cand.hyper["rank"].tolist()
    assert len(cand.params) == len(cand.flops) == len(cand.hyper["iters"]) == len(cand)


# ---- which layers -----------------------------------------------------------------------------


@pytest.mark.parametrize("layer,expected", [
    (nn.Conv2d(4, 4, 3), {"spatial_svd": True, "tucker2": True, "cp": True}),
    (nn.Conv2d(4, 4, (1, 3)), {"spatial_svd": False, "tucker2": True, "cp": True}),
    (nn.Conv2d(4, 4, 1), {"spatial_svd": False, "tucker2": False, "cp": False}),
    (nn.Conv2d(4, 4, 3, groups=4), {"spatial_svd": False, "tucker2": False, "cp": False}),
    (nn.Conv2d(4, 4, 2, padding="same"), {"spatial_svd": False, "tucker2": False, "cp": False}),
    (nn.Conv1d(4, 4, 3), {"spatial_svd": False, "tucker2": False, "cp": False}),
    (nn.Linear(4, 4), {"spatial_svd": False, "tucker2": False, "cp": False}),
], ids=["3x3", "1x3", "1x1", "depthwise", "same-even", "conv1d", "linear"])
def test_supports(layer, expected):
    assert {f: get_family(f).supports(layer, None) for f in FAMILIES} == expected


# ---- bad input ----------------------------------------------------------------------------------


BAD_HYPER = [
    ("spatial_svd", {}, ValueError, "rank"),
    ("spatial_svd", {"rank": 0}, ValueError, "rank"),
    ("spatial_svd", {"rank": 2.0}, TypeError, "rank"),
    ("spatial_svd", {"rank": "3"}, TypeError, "rank"),
    ("spatial_svd", {"rank": 19}, ValueError, "rank"),  # min(6*3, 3*8) = 18
    ("tucker2", {"rank_in": 2}, ValueError, "rank_out"),
    ("tucker2", {"rank_in": 0, "rank_out": 2}, ValueError, "rank_in"),
    ("tucker2", {"rank_in": 2, "rank_out": 9}, ValueError, "rank_out"),
    ("tucker2", {"rank_in": 7, "rank_out": 2}, ValueError, "rank_in"),
    ("tucker2", {"rank_in": 2, "rank_out": 2, "hooi_iters": -1}, ValueError, "hooi_iters"),
    ("tucker2", {"rank_in": 2, "rank_out": 2, "hooi_iters": 1.5}, TypeError, "hooi_iters"),
    ("cp", {"iters": 3}, ValueError, "rank"),
    ("cp", {"rank": 0}, ValueError, "rank"),
    ("cp", {"rank": True}, TypeError, "rank"),
    ("cp", {"rank": 55}, ValueError, "rank"),  # a CP rank of an 8x6x3x3 tensor is at most 6*3*3 = 54
    ("cp", {"rank": 2, "iters": 0}, ValueError, "iters"),
]


@pytest.mark.parametrize("family,hyper,exc,name", BAD_HYPER,
                         ids=[f"{f}-{sorted(h.items())}" for f, h, _, _ in BAD_HYPER])
@pytest.mark.parametrize("builder", ["realize", "skeleton"])
def test_bad_hyperparameters(family, hyper, exc, name, builder):
    conv = nn.Conv2d(6, 8, 3)
    fam = get_family(family)
    build = fam.realize if builder == "realize" else (lambda m, h, _: fam.skeleton(m, h))
    with pytest.raises(exc, match=name):
        build(conv, hyper, None)


def test_not_a_conv_is_rejected():
    for family in FAMILIES:
        with pytest.raises(TypeError, match=family):
            get_family(family).realize(nn.Linear(4, 4), {"rank": 1, "rank_in": 1, "rank_out": 1}, None)


BAD_OPTIONS = [
    ("tucker2", {"hooi_iters": -1}, ValueError, "hooi_iters"),
    ("tucker2", {"hooi_iters": "2"}, TypeError, "hooi_iters"),
    ("tucker2", {"ranks": "best"}, ValueError, "ranks"),
    ("tucker2", {"rank": 3}, ValueError, "rank"),
    ("cp", {"max_rank": 0}, ValueError, "max_rank"),
    ("cp", {"n_iter_max": 0}, ValueError, "n_iter_max"),
    ("cp", {"tol": -1.0}, ValueError, "tol"),
    ("cp", {"tol": "small"}, TypeError, "tol"),
    ("cp", {"seed": 1}, ValueError, "seed"),  # unknown option
    ("spatial_svd", {"rank": 3}, ValueError, "rank"),
]


@pytest.mark.parametrize("family,opts,exc,name", BAD_OPTIONS,
                         ids=[f"{f}-{sorted(o.items())}" for f, o, _, _ in BAD_OPTIONS])
def test_bad_options(family, opts, exc, name):
    conv, _, info, _ = setup(CASES[0], family)
    cfg = CurveConfig(families=(family,), options={family: opts})
    with pytest.raises(exc, match=name):
        get_family(family).candidates(conv, info, cfg, None)


# ---- end to end ---------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.b = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = F.relu(self.b(h))
        h = F.relu(self.c(h))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("families", [["spatial_svd"], ["tucker2"], ["cp"], ["alds", "spatial_svd"],
                                      ["alds", "tucker2"], ["alds", "cp"]],
                         ids=lambda f: "+".join(f))
@pytest.mark.parametrize("calibrated", [False, True], ids=["weights", "calibrated"])
def test_optimize_meets_the_budget(families, calibrated):
    torch.manual_seed(0)
    model, x = TinyCNN().eval(), torch.randn(2, 3, 8, 8)
    before = autorank.count_params(model)
    curves = CurveConfig(grid_points=8, options=OPTIONS)
    calibration = [torch.randn(4, 3, 8, 8)] if calibrated else None
    result = autorank.optimize(model, budget=0.5, example_inputs=x,
                               compression=autorank.Compression(families=families, curves=curves),
                               calibration=calibration)
    assert result.plan.totals["params"] <= 0.5 * before
    assert autorank.count_params(result.model) == result.plan.totals["params"]
    used = {lp.family for lp in result.plan.layers.values() if lp.compressed}
    assert used <= set(families)
    if len(families) == 1:
        assert used == set(families)
    with torch.no_grad():
        assert result.model(x).shape == (2, 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    torch.manual_seed(0)
    model, x = TinyCNN().eval(), torch.randn(2, 3, 8, 8)
    curves = CurveConfig(grid_points=6, options=OPTIONS)
    result = autorank.optimize(model, budget=0.6, example_inputs=x,
                               compression=autorank.Compression(families=[family], curves=curves))
    autorank.save(result.model, result.plan, tmp_path / "saved")
    loaded = autorank.load(tmp_path / "saved", TinyCNN())
    assert {type(m) for m in loaded.modules()} == {type(m) for m in result.model.modules()}
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


# ---- closed forms and warm starts (issue 17: cheap candidates) ------------------------------

# larger than 64 output channels, so the Lanczos path of top_eigen runs
BIG = lambda: nn.Conv2d(12, 72, 3)  # noqa: E731


@pytest.mark.parametrize("pairs", [[(1, 1), (2, 5), (5, 2), (6, 40), (12, 72), (12, 1), (1, 72), (7, 33)]])
def test_tucker2_closed_form_equals_built_hosvd(pairs):
    from autorank.families.tucker import tucker2_factors, tucker2_hosvd_errors, tucker2_hosvd_frobenius

    torch.manual_seed(0)
    conv = BIG()
    w = conv.weight.detach()
    r3, r4 = np.array(pairs).T
    closed = tucker2_hosvd_errors(w, r3, r4)
    frob = tucker2_hosvd_frobenius(w, r3, r4)
    W = weight_matrix(conv).double()
    for (a, b), err, fro in zip(pairs, closed, frob):
        hosvd_w = tucker2_weight(*tucker2_factors(w, a, b, hooi_iters=0)).reshape(W.shape)
        # near zero the closed form loses to cancellation: ||E||^2 ~ eps ||W||^2, so ~1e-8 in the error
        assert err == pytest.approx(relative_spectral_error(W, hosvd_w), abs=1e-7), (a, b)
        assert fro == pytest.approx(float((W - hosvd_w).norm() / W.norm()), abs=1e-10), (a, b)
        # the built module (factors in float32) too
        new = get_family("tucker2").realize(conv, {"rank_in": a, "rank_out": b, "hooi_iters": 0}, None)
        assert err == pytest.approx(relative_spectral_error(W, weight_matrix(new.to_dense())), abs=1e-6)
    assert closed[pairs.index((12, 72))] < 1e-6  # full ranks are exact


def test_spatial_closed_form_equals_built():
    from autorank.families.spatial import spatial_svd_errors

    torch.manual_seed(0)
    conv = BIG()
    ranks = [1, 2, 7, 20, 36]
    closed = spatial_svd_errors(conv.weight, ranks)
    fam = get_family("spatial_svd")
    for k, err in zip(ranks, closed):
        built = fam.realize(conv, {"rank": k}, None).to_dense()
        assert err == pytest.approx(relative_spectral_error(weight_matrix(conv), weight_matrix(built)), abs=1e-6), k
    assert closed[-1] < 1e-6 and np.all(np.diff(closed) <= 1e-12)


@pytest.mark.xfail(strict=True, reason="known: a warm-started chain can settle in a worse fit at the largest ranks "
                   "(0.808 against 0.741 at rank 12), so CurveConfig's cp warm_iters defaults to 0 (cold fits)")
def test_cp_warm_starts_are_no_worse_than_cold_fits():
    from autorank.families.conv import leading_left, unfold_in, unfold_out
    from autorank.families.cp import cp_chain, cp_errors

    torch.manual_seed(0)
    conv = nn.Conv2d(10, 12, 3)
    w = conv.weight.detach()
    bases = (leading_left(unfold_out(w)), leading_left(unfold_in(w)))
    ranks = [1, 2, 3, 5, 8, 12]
    warm = cp_chain(w, ranks, 60, 0.0, 30, bases)
    cold = [cp_factors(w, r, 60, 0.0, bases=bases) for r in ranks]
    e_warm, e_cold = cp_errors(w, warm, bases), cp_errors(w, cold, bases)
    W = weight_matrix(conv).double()
    for fac, err in zip(warm + cold, np.concatenate([e_warm, e_cold])):  # the closed form is the measured error
        approx = cp_weight(fac.out, fac.inp, fac.vertical, fac.horizontal).reshape(W.shape)
        assert err == pytest.approx(relative_spectral_error(W, approx), abs=1e-8)
    assert np.all(e_warm <= e_cold + 0.01), (e_warm, e_cold)
    assert np.all(np.diff(e_warm) <= 1e-9)  # each warm fit starts from the previous rank's: no step back up


@pytest.mark.parametrize("family", FAMILIES)
def test_the_plan_reports_the_error_of_what_is_built(family):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(1, 6, 8, 8)
    curves = CurveConfig(families=(family,), grid_points=5, options=OPTIONS if family == "cp" else {})
    res = autorank.optimize(model, 0.5, x, compression=autorank.Compression(curves=curves), progress=False)
    layers = [lp for lp in res.plan.layers.values() if lp.compressed]
    assert layers
    for lp in layers:
        built = res.model.get_submodule(lp.name).to_dense()
        dense = model.get_submodule(lp.name)
        assert lp.error == pytest.approx(relative_spectral_error(weight_matrix(dense), weight_matrix(built)),
                                         abs=1e-6), lp.name
    assert res.plan.max_error == pytest.approx(max(lp.error for lp in res.plan.layers.values()))


@pytest.mark.parametrize("shape", [(8, 64, 3, 3), (64, 8, 3, 3), (16, 16, 3, 3)], ids=["tall", "wide", "square"])
def test_spatial_svd_of_a_rank_deficient_kernel_is_exact_past_its_rank(shape):
    from autorank.families.spatial import spatial_matrix, spatial_svd, spatial_svd_errors, spatial_svd_weight

    f, c, kh, kw = shape
    g = torch.Generator().manual_seed(0)
    rank = 3
    w = spatial_svd_weight(torch.randn(rank, c, kh, 1, generator=g, dtype=torch.float64),
                           torch.randn(f, rank, 1, kw, generator=g, dtype=torch.float64))
    u, s, vh = spatial_svd(w)
    ref = torch.linalg.svdvals(spatial_matrix(w))
    assert int((s > 0).sum()) == rank  # the null directions are cut, not left at a ~1e-8 noise floor
    torch.testing.assert_close(s[:rank], ref[:rank], rtol=1e-12, atol=0)
    assert float(((u * s) @ vh - spatial_matrix(w)).norm() / spatial_matrix(w).norm()) < 1e-13
    errors = spatial_svd_errors(w, [1, rank, rank + 1])
    assert errors[0] > 0.01 and errors[1] < 1e-12 and errors[2] < 1e-12


# (f, c, kh, kw): spatial matrices whose smaller side reaches FAST_EIGH_SIZE (float32 eigenvectors) or
# stays below it (float64); the errors are those of a float64 SVD's truncations either way
SPATIAL_PRECISION_CASES = [(176, 176, 3, 3), (176, 256, 3, 3), (176, 40, 3, 3)]


@pytest.mark.parametrize("shape", SPATIAL_PRECISION_CASES, ids=lambda s: "x".join(map(str, s)))
def test_spatial_svd_errors_match_a_float64_svd(shape):
    from autorank.families.spatial import spatial_matrix, spatial_svd_errors, spatial_svd_factors, spatial_svd_weight
    from autorank.linalg import FAST_EIGH_SIZE

    f, c, kh, kw = shape
    w = torch.randn(f, c, kh, kw, generator=torch.Generator().manual_seed(0))  # float32, as a layer's
    m = spatial_matrix(w)
    fast = min(m.shape) >= FAST_EIGH_SIZE
    assert fast == (shape != (176, 40, 3, 3))  # the table covers both paths
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    ranks = [1, 7, min(m.shape) // 3, min(m.shape) // 2]
    errors = spatial_svd_errors(w, ranks)
    for k, err in zip(ranks, errors):
        w_hat = ((u[:, :k] * s[:k]) @ vh[:k]).reshape(c, kh, kw, f).permute(3, 0, 1, 2)
        ref = relative_spectral_error(w.reshape(f, -1).double(), w_hat.reshape(f, -1))
        assert err == pytest.approx(ref, abs=1e-6), k
        built = spatial_svd_weight(*spatial_svd_factors(w, k))
        assert relative_spectral_error(w.reshape(f, -1).double(), built.reshape(f, -1)) == pytest.approx(err, abs=1e-7)


def test_hooi_in_float32_is_no_worse_than_hosvd():
    from autorank.families.tucker import fit
    from autorank.linalg import FAST_EIGH_SIZE

    torch.manual_seed(0)
    conv = nn.Conv2d(8, FAST_EIGH_SIZE, 3)  # 512 output channels: HOOI sweeps in float32
    w = conv.weight.detach().double()
    frob = lambda u_in, u_out: float((w - tucker2_weight(u_in, tucker2_core(w, u_in, u_out), u_out)).norm())
    u_in, u_out = hosvd(w, 3, 40)
    swept = hooi(w, u_in, u_out, 2)
    assert all(t.dtype == torch.float64 for t in swept)
    assert frob(*swept) < frob(u_in, u_out)  # HOOI moves, and not up, at float32 precision
    eye = torch.eye(40, dtype=torch.float64)
    assert float((swept[1].T @ swept[1] - eye).abs().max()) < 1e-5  # orthonormal to float32 rounding
    _, err, _ = fit(conv, 3, 40, 2)
    _, err_hosvd, _ = fit(conv, 3, 40, 0)
    assert err <= err_hosvd  # fit keeps the better of the two, measured in float64


# (rows, cols, kind, rel): wide and tall, the small side past 64 (Lanczos) or not (LAPACK), full
# rank, rank-deficient and zero; a degenerate top (60 equal singular values) and a clustered but
# distinct one (20 values 1e-3 apart), where Lanczos needs the most steps and tol = 1e-6 bounds
# the eigenvalue by ||r||^2 / delta rather than by rounding
TOP_GRAM_CASES = [(80, 300, "random", 1e-10), (300, 80, "random", 1e-10), (300, 40, "random", 1e-10),
                  (40, 90, "random", 1e-10), (100, 100, 3, 1e-10), (90, 500, 0, 1e-10),
                  (120, 200, "degenerate", 1e-10), (120, 200, "clustered", 1e-7)]


def _gram_case(rows, cols, kind):
    g = torch.Generator().manual_seed(1)
    if kind in ("degenerate", "clustered"):
        q1, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(cols, rows, generator=g, dtype=torch.float64))
        if kind == "degenerate":
            s = torch.cat([torch.ones(60), torch.linspace(0.9, 0.01, rows - 60)])
        else:
            s = torch.cat([1 - 1e-3 * torch.arange(20) / 20, torch.linspace(0.9, 0.01, rows - 20)])
        return q1 * s.double() @ q2.T
    if kind == "random":
        return torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return torch.randn(rows, kind, generator=g, dtype=torch.float64) @ torch.randn(kind, cols, generator=g,
                                                                                  dtype=torch.float64)


@pytest.mark.parametrize("rows,cols,kind,rel", TOP_GRAM_CASES)
def test_top_gram_eigen_equals_largest_eigenvalue(rows, cols, kind, rel):
    from autorank.families.conv import top_eigen, top_gram_eigen

    r = _gram_case(rows, cols, kind)
    want = float(torch.linalg.eigvalsh(r @ r.T if rows <= cols else r.T @ r)[-1])
    got = top_gram_eigen(r)
    assert got == pytest.approx(want, rel=rel, abs=1e-12)
    assert got <= want * (1 + 1e-12) + 1e-300  # a Ritz value never exceeds lambda_max
    if rows > 64:
        assert top_eigen(r @ r.T)[0] == pytest.approx(want, rel=rel, abs=1e-12)
    # float32 rows: computed in float64 from the float32 values; rounding splits a degenerate top
    # into a cluster ~1e-7 wide, so only the residual bound applies
    r32, rel = r.float(), max(rel, 1e-7)
    want32 = float(torch.linalg.eigvalsh((r32.double() @ r32.double().T) if rows <= cols
                                         else (r32.double().T @ r32.double()))[-1])
    assert top_gram_eigen(r32) == pytest.approx(want32, rel=rel, abs=1e-12)


def test_top_gram_eigen_falls_back_to_lapack_and_handles_empty():
    from autorank.families.conv import top_gram_eigen

    r = _gram_case(120, 200, "clustered")
    want = float(torch.linalg.eigvalsh(r @ r.T)[-1])
    assert top_gram_eigen(r, steps=2, restarts=1) == pytest.approx(want, rel=1e-12)  # Lanczos cannot converge
    assert top_gram_eigen(torch.zeros(0, 5)) == 0.0
    assert top_gram_eigen(torch.zeros(100, 100)) == 0.0


def test_lanczos_recovers_a_top_eigenvector_the_start_misses():
    """A = I + u u^T with u orthogonal to the fixed start: the Krylov space stays orthogonal to u
    and Lanczos stops at once on theta = 1; theta < max(diag A) = 1 + u_0^2 makes it restart."""
    from autorank.families.conv import top_eigen, top_gram_eigen

    n = 100
    v0 = torch.ones(n, dtype=torch.float64) + torch.arange(n, dtype=torch.float64) / n
    u = torch.zeros(n, dtype=torch.float64)
    u[0], u[1] = v0[1], -v0[0]
    u /= u.norm()
    a = torch.eye(n, dtype=torch.float64) + torch.outer(u, u)
    assert top_eigen(a)[0] == pytest.approx(2.0, rel=1e-10)
    assert top_eigen(a, start=v0)[0] == pytest.approx(2.0, rel=1e-10)  # a warm start orthogonal to u
    root = torch.linalg.cholesky(a)  # a = L L^T: the same operator from rows
    assert top_gram_eigen(root) == pytest.approx(2.0, rel=1e-10)


def test_looser_lanczos_tolerance_keeps_the_closed_form_errors():
    """tol = 1e-6 (the default) against 1e-9 on the closed-form curves of three conv families."""
    import autorank.families.conv as conv_mod
    from autorank.families.spatial import spatial_svd_errors
    from autorank.families.tucker import tucker2_hosvd_errors, tucker2_rankas_pairs

    torch.manual_seed(0)
    w = nn.Conv2d(48, 96, 3).weight.detach()
    r3, r4 = tucker2_rankas_pairs(48, 96, 8)
    ranks = np.arange(1, 144, 9)
    loose = tucker2_hosvd_errors(w, r3, r4), spatial_svd_errors(w, ranks)
    strict_eigen = conv_mod.top_eigen
    try:
        import autorank.families.spatial as sp_mod
        import autorank.families.tucker as tk_mod

        strict = lambda sym, start=None, tol=1e-9, **kw: strict_eigen(sym, start, 1e-9, **kw)  # noqa: E731
        tk_mod.top_eigen = sp_mod.top_eigen = strict
        tight = tucker2_hosvd_errors(w, r3, r4), spatial_svd_errors(w, ranks)
    finally:
        tk_mod.top_eigen = sp_mod.top_eigen = strict_eigen
    for a, b in zip(loose, tight):
        assert np.abs(a - b).max() < 1e-9


def test_top_gram_eigen_rejects_a_vector():
    from autorank.families.conv import top_gram_eigen

    with pytest.raises(ValueError, match=r"2-D matrix, got shape \(5,\)"):
        top_gram_eigen(torch.ones(5))
