r"""Shared linear algebra: symmetric eigendecompositions, truncated SVDs and the whitened truncation.

A leaf (it imports only :mod:`autorank._util`); every family, error measure and
allocator that needs a spectrum gets it from here, computed one way, in float64.

**Singular values from the smaller Gram matrix.**  For ``A`` (``f x n``) the
eigenvalues of ``A A^T`` (when ``f <= n``) or ``A^T A`` (otherwise) are
``sigma_l^2``, so

    sigma(A) = sqrt(max(eig(G), 0)),      G = A A^T  or  A^T A   (the smaller one),

cheaper than an SVD of a wide or tall matrix and accurate to ``~1e-8 sigma_1`` in
float64.  The eigenvectors of ``G`` are the left (``f <= n``) or right singular
vectors.  Problems of size ``<= 1024`` run on one thread
(:func:`autorank._util.single_thread`).

**Data-aware (whitened) truncation.**  The error of ``W_hat`` on calibration inputs
``X`` with second moment ``M = E[x x^T]`` (:mod:`autorank.calibration`) is

    ||(W - W_hat) X||_F^2 = tr(R M R^T) N,     R = W - W_hat.

With a square-root ``M = L L^T`` (e.g. Cholesky), this is ``||R L||_F^2``, so the
best rank-``j`` ``W_hat`` truncates the SVD of ``W L`` (Eckart-Young) and maps
back: ``W_hat = [W L]_j L^{-1}`` (SVD-LLM).  Since ``[W L]_j = U_j U_j^T W L``
with ``U_j`` the top-``j`` left singular vectors of ``W L`` -- the top
eigenvectors of ``W M W^T`` --

    W_hat = U_j U_j^T W ,

the same optimum without forming ``L^{-1}``: it needs no damping and is exact for a
rank-deficient ``M`` too (directions the data never excites are not inverted, so
nothing blows up there).  autorank realises this projection form
(:func:`whitened_factors`); :func:`whitened_factors_cholesky` computes the SVD-LLM
form with a damped Cholesky factor ``L = chol(M + delta * mean(diag M) * I)`` and
agrees with it to within the damping on full-rank data (tested), which is the check
that both are the same optimum.  The errors of all ranks come from the eigenvalues
``lambda_l`` of ``W M W^T``:

    eps(j)^2 = sum_{l > j} lambda_l / sum_l lambda_l .

**Output weighting (two-sided whitening).**  A layer's output error ``d = R x`` does
not reach the model's output equally in every direction: to first order the model's
output moves by ``J d``, ``J`` the Jacobian of the output with respect to the layer's
output at that position.  Its expected square, with the inputs and the Jacobians
taken as independent (the Kronecker factorisation of K-FAC), is

    E ||J R x||^2  ~=  tr(R M R^T G),        G = E[J^T J]      (f x f),

the Gauss-Newton matrix of ``E ||output - output_hat||^2`` at the layer's output
(estimated by :func:`autorank.calibration.collect_output_moments`).  With ``G = S^2``
(symmetric root) the objective is ``||S R L||_F^2``, so the best rank-``j`` ``W_hat`` is

    W_hat = S^{-1} [S W L]_j L^{-1} :

every formula above applied to ``W' = S W``, with the left factor mapped back by
``S^{-1}`` (input groups split the columns, so one ``S`` serves them all).
``G`` is damped, ``G + delta * mean(eig G) * I`` (``delta`` = :data:`OUTPUT_DAMPING`),
which bounds ``S^{-1}`` and moves towards the input-only whitening as ``delta`` grows;
a layer the output does not depend on (``G = 0``) gets ``S = I``.

**Tall layers in input space.**  A block ``W_i`` with more rows than columns (``f > n/k``:
an LM head, an MLP's up-projection) never needs its ``f x n`` float64 copy.  With
``P = W^T W`` (``n x n``, :func:`column_gram`, accumulated over row chunks) and ``M_ii =
S_i S_i^T`` (``S_i = Q_i Lambda_i^{1/2}``), the eigenvectors ``v_l`` of
``S_i^T P_ii S_i`` (eigenvalues ``sigma_l^2 = lambda_l``) give ``U_i = W_i T_i`` with
``T_i = S_i V_i Sigma_i^{-1}`` (:func:`tall_whitened_eigen`), so every quantity of the
curves is an ``n``-sized product:

    U_i^T U_i' = T_i^T P_ii' T_i',    U_i^T W_i = T_i^T P_ii,    ||W X||_F^2 / N = tr(P M),

and the factors are ``B_i = W_i T_i`` (one pass over row chunks of ``W``) and
``A_i = B_i^T W_i = T_i^T P_ii`` (:func:`whitened_factors`).  The memory is ``O(n^2 +
f * rank)`` instead of several ``f x n`` float64 copies, and ``P`` is computed once for
every ``k``.
"""

from __future__ import annotations

import math
import weakref

import torch

from ._util import single_thread

__all__ = [
    "OUTPUT_DAMPING",
    "sym_eigh",
    "sym_eigvalsh",
    "eigh_desc",
    "smaller_gram",
    "gram_eigh",
    "gram_eigh_fast",
    "FAST_EIGH_SIZE",
    "singular_values",
    "split_columns",
    "column_gram",
    "rows_matmul",
    "tall_whitened_eigen",
    "is_tall",
    "check_blocks",
    "grouped_low_rank_factors",
    "output_roots",
    "output_weighted",
    "weighted_gram",
    "moment_blocks",
    "whitened_eigen",
    "whitened_basis",
    "block_eigen",
    "whitened_factors",
    "whitened_factors_cholesky",
]

#: default relative damping ``delta`` of the output moment: ``G + delta * mean(eig G) * I``
OUTPUT_DAMPING = 0.1


# ---- symmetric eigendecompositions ------------------------------------------------------------


def _symmetric(mat: torch.Tensor, symmetrize: bool) -> torch.Tensor:
    return 0.5 * (mat + mat.T) if symmetrize else mat


def sym_eigh(mat: torch.Tensor, symmetrize: bool = False,
             threads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues, eigenvectors)`` of a symmetric matrix (or a batch), ascending, as LAPACK returns them.

    ``symmetrize``: decompose ``(A + A^T) / 2`` of a 2-D ``mat``.  ``threads``: use all of
    torch's threads whatever the size (else one thread up to ``1024 x 1024``).
    """
    mat = _symmetric(mat, symmetrize)
    if threads:
        return torch.linalg.eigh(mat)
    with single_thread(mat.shape[-1]):
        return torch.linalg.eigh(mat)


def sym_eigvalsh(mat: torch.Tensor, symmetrize: bool = False, threads: bool = False) -> torch.Tensor:
    """The eigenvalues of a symmetric matrix (or a batch), ascending; arguments as :func:`sym_eigh`."""
    mat = _symmetric(mat, symmetrize)
    if threads:
        return torch.linalg.eigvalsh(mat)
    with single_thread(mat.shape[-1]):
        return torch.linalg.eigvalsh(mat)


def eigh_desc(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max(lambda, 0), Q)`` of a symmetric ``mat = Q diag(lambda) Q^T``, eigenvalues descending."""
    evals, evecs = sym_eigh(mat)
    return evals.flip(-1).clamp_min(0), evecs.flip(-1)


# ---- singular values and truncated SVDs from the smaller Gram matrix --------------------------


def smaller_gram(a: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(A A^T, True)`` when ``A`` (or each matrix of a batch) has no more rows than columns, else ``(A^T A, False)``."""
    left = a.shape[-2] <= a.shape[-1]
    at = a.transpose(-2, -1)
    return (a @ at if left else at @ a), left


def gram_eigh(a: torch.Tensor, symmetrize: bool = False,
              threads: bool = False) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(eigenvalues, eigenvectors, left)`` of :func:`smaller_gram` of ``a``, ascending.

    ``eigenvalue_l = sigma_l(A)^2``; the eigenvectors are the left singular vectors when
    ``left``, else the right ones.  Arguments as :func:`sym_eigh`.
    """
    gram, left = smaller_gram(a)
    evals, evecs = sym_eigh(gram, symmetrize, threads)
    return evals, evecs, left


#: the size from which the conv families decompose in float32 the Gram matrices whose eigenvectors
#: only become float32 layer weights (their errors are still measured in float64)
FAST_EIGH_SIZE = 512


def gram_eigh_fast(a: torch.Tensor, threads: bool = False) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`gram_eigh` with the Gram matrix formed and decomposed in float32; eigenvectors returned float64.

    For factors that end up as float32 layer weights: the subspaces are accurate to
    ``~1e-7 lambda_1 / gap`` (float32 rounding), no worse than the rounding of the factors
    to the layer's dtype, at about half the cost of float64 (measured on ResNet-18's
    ``1536 x 1536`` spatial Gram matrices: 0.47 s against 1.11 s on one thread).  Callers
    measure their errors in float64 from ``a`` and these eigenvectors (so an error stays the
    error of what is built); the eigenvalues are float32's and only a guide.
    """
    a32 = a.to(torch.float32)
    gram, left = smaller_gram(a32)
    evals, evecs = sym_eigh(gram, threads=threads)
    return evals.to(torch.float64), evecs.to(torch.float64), left


def singular_values(a: torch.Tensor, threads: bool = False) -> torch.Tensor:
    """Descending singular values ``sqrt(max(eig(G), 0))`` of ``a`` (or of each matrix of a batch), ``G`` :func:`smaller_gram`.

    ``a`` should be float64; the result has ``a``'s dtype and shape ``(..., min(f, n))``.
    """
    gram, _ = smaller_gram(a)
    return sym_eigvalsh(gram, threads=threads).flip(-1).clamp_min(0).sqrt()


def split_columns(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The ``groups`` contiguous column blocks ``W_1 .. W_k`` of ``W`` (``f x n``) as a float64 ``(k, f, n/k)`` tensor."""
    f, n = weight.shape
    if n % groups:
        raise ValueError(f"groups={groups} does not divide the {n} input columns")
    return weight.detach().to(torch.float64).reshape(f, groups, n // groups).transpose(0, 1)


#: rows of ``W`` converted to float64 at a time by :func:`column_gram` and :func:`rows_matmul`
ROW_CHUNK = 4096


def column_gram(weight: torch.Tensor, chunk: int = ROW_CHUNK) -> torch.Tensor:
    """``W^T W`` (``n x n``, float64) of ``W`` (``f x n``), accumulated over float64 chunks of ``chunk`` rows."""
    w = weight.detach()
    n = w.shape[1]
    p = torch.zeros(n, n, dtype=torch.float64, device=w.device)
    for lo in range(0, w.shape[0], chunk):
        c = w[lo:lo + chunk].to(torch.float64)
        p.addmm_(c.T, c)
    return p


def rows_matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64,
                chunk: int = ROW_CHUNK, out: torch.Tensor | None = None) -> torch.Tensor:
    """``A B`` in float64 (``b`` float64), ``chunk`` rows of ``A`` at a time, stored as ``dtype`` (or into ``out``).

    For a tall ``A`` (``f x n``, any float dtype): no float64 copy of ``A`` is made."""
    a = a.detach()
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=dtype, device=a.device)
    for lo in range(0, a.shape[0], chunk):
        out[lo:lo + chunk] = (a[lo:lo + chunk].to(torch.float64) @ b).to(dtype)
    return out


def grouped_low_rank_factors(
    weight_matrix: torch.Tensor, groups: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of each of the ``groups`` column blocks of ``weight_matrix``.

    Returns ``A`` of shape ``(groups, rank, n/groups)`` and ``B`` of shape
    ``(groups, f, rank)`` such that ``W_i ~= B[i] @ A[i]`` is the truncated SVD
    ``U_j S_j V_j^T`` of block ``i`` (Eckart-Young optimal in spectral and Frobenius
    norm), with the singular values split evenly, ``B = U S^{1/2}``, ``A = S^{1/2} V^T``.

    The factors are computed in float64 and returned in float64.
    """
    f, n = weight_matrix.shape
    if n % groups:
        raise ValueError(f"groups={groups} does not divide the {n} input columns")
    m = min(f, n // groups)
    if not 1 <= rank <= m:
        raise ValueError(f"rank must be in [1, {m}] for a {f}x{n // groups} block, got {rank}")
    w = split_columns(weight_matrix, groups)
    # The top singular subspace from the eigendecomposition of the smaller Gram matrix
    # (much cheaper than a full SVD of a wide block).  B @ A is the orthogonal
    # projection of W_i onto that subspace, i.e. its truncated SVD.
    evals, evecs, left = gram_eigh(w)
    top = evecs[:, :, -rank:].flip(-1)  # (k, m, rank), descending singular values
    s = evals[:, -rank:].flip(-1).clamp_min(0).sqrt()
    floor = torch.finfo(torch.float64).tiny ** 0.5
    root = s.clamp_min(floor).sqrt().unsqueeze(1)  # (k, 1, rank)
    if left:  # W_i ~= U_j U_j^T W_i;  B = U_j S^{1/2},  A = S^{-1/2} U_j^T W_i
        b = top * root
        a = (top / root).transpose(1, 2) @ w
    else:  # W_i ~= W_i V_j V_j^T;  A = S^{1/2} V_j^T,  B = W_i V_j S^{-1/2}
        a = (top * root).transpose(1, 2)
        b = (w @ top) / root
    return a, b


# ---- the whitened (data-aware) truncation ------------------------------------------------------


# (S, S^{-1}) of every output moment tensor seen, by the tensor object: a layer's output moment is
# used by its curves, its realisation and its refit, and its eigendecomposition is the costliest
# step of each (an f x f eigh).  An entry goes away with its tensor.
_ROOTS: dict[int, tuple[object, int, dict[float, tuple[torch.Tensor, torch.Tensor]]]] = {}


def output_roots(g: torch.Tensor, damping: float = OUTPUT_DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S^{-1})`` with ``S = (G + delta * mean(eig G) * I)^{1/2}`` symmetric, float64.

    ``G = 0`` (the output does not depend on the layer) gives ``(I, I)``.  The result is
    computed once per tensor ``g`` (and damping) and reused while ``g`` lives unmodified (an
    in-place change bumps the tensor's version and the roots are computed afresh); the
    tensors returned are shared, so callers must not modify them in place.
    """
    entry = _ROOTS.get(id(g))
    fresh = entry is not None and entry[0]() is g and entry[1] == g._version
    if fresh and damping in entry[2]:
        return entry[2][damping]
    roots = _output_roots(g, damping)
    if not g.requires_grad:  # a tensor in an autograd graph may change under us: no cache
        if not fresh:
            key = id(g)
            entry = (weakref.ref(g, lambda _, key=key: _ROOTS.pop(key, None)), g._version, {})
            _ROOTS[key] = entry
        entry[2][damping] = roots
    return roots


@torch.no_grad()
def _output_roots(g: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    if damping <= 0 or not math.isfinite(damping):
        raise ValueError(f"output damping must be a positive number, got {damping!r}")
    g = g.detach().to(torch.float64)
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"an output moment must be a square matrix, got shape {tuple(g.shape)}")
    lam, q = sym_eigh(g, symmetrize=True)
    lam = lam.clamp_min(0)
    mean = float(lam.mean())
    if mean <= 0:
        eye = torch.eye(g.shape[0], dtype=torch.float64)
        return eye, eye.clone()
    root = (lam + damping * mean).sqrt()
    return (q * root) @ q.T, (q / root) @ q.T


def weighted_gram(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``W M W^T`` for a full ``M`` (``n x n``) or a diagonal one (``(n,)``)."""
    return (w * m) @ w.T if m.dim() == 1 else w @ m @ w.T


def output_weighted(weight: torch.Tensor, output: torch.Tensor | None,
                    damping: float = OUTPUT_DAMPING) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(S W, S^{-1})`` for an output moment ``G`` (:func:`output_roots`), or ``(W, None)`` without one."""
    if output is None:
        return weight, None
    f = weight.shape[0]
    if tuple(output.shape) != (f, f):
        raise ValueError(f"output moment of shape {tuple(output.shape)} does not match a weight with {f} rows")
    root, inv = output_roots(output, damping)
    return root @ weight.detach().to(torch.float64), inv


def check_blocks(weight: torch.Tensor, moment: torch.Tensor, groups: int) -> None:
    """``ValueError`` unless ``groups`` divides the columns of ``W`` and ``moment`` is ``n x n``, or a
    diagonal ``(n,)`` (an embedding's one-hot inputs, ``groups = 1`` only)."""
    n = weight.shape[1]
    if n % groups:
        raise ValueError(f"groups={groups} does not divide the {n} input columns")
    if moment.dim() == 1 and moment.shape[0] == n:
        if groups != 1:
            raise ValueError("a diagonal moment (embedding) supports groups=1 only")
    elif moment.shape != (n, n):
        raise ValueError(f"moment of shape {tuple(moment.shape)} does not match a weight with {n} columns")


def moment_blocks(weight: torch.Tensor, moment: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_1 .. W_k, M)``: :func:`split_columns` of ``W`` and the moment in float64, their shapes checked
    (:func:`check_blocks`)."""
    check_blocks(weight, moment, groups)
    if moment.dim() == 1:
        return weight.detach().to(torch.float64).unsqueeze(0), moment.to(torch.float64)
    return split_columns(weight, groups), moment.to(torch.float64)


def whitened_eigen(w: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``r = min(f, n)`` eigenpairs of ``W M W^T`` for one block ``W`` (``f x n``), descending.

    With ``f <= n`` the ``f x f`` matrix is decomposed directly.  Otherwise the
    ``n x n`` side is used: ``M = S S^T`` (``S = Q Lambda^{1/2}``), the eigenvectors of
    ``(W S)^T (W S)`` give ``u_l = W S v_l / sigma_l``; directions with
    ``sigma_l <= 1e-7 sigma_1`` carry ``lambda_l <= 1e-14 lambda_1`` and are set to zero
    (the data never excites them, so they add nothing to any error).
    """
    f, n = w.shape
    if f <= n:
        g = weighted_gram(w, m)
        evals, u = eigh_desc(0.5 * (g + g.T))
        return evals, u
    if m.dim() == 1:
        ws = w * m.clamp_min(0).sqrt()
    else:
        lam, q = eigh_desc(0.5 * (m + m.T))
        ws = w @ (q * lam.sqrt())
    evals, v = eigh_desc(ws.T @ ws)
    sig = evals.sqrt()
    keep = sig > 1e-7 * sig[0] if sig[0] > 0 else torch.zeros_like(sig, dtype=torch.bool)
    u = (ws @ v) / torch.where(keep, sig, torch.ones_like(sig))
    u[:, ~keep] = 0.0
    return torch.where(keep, evals, torch.zeros_like(evals)), u


def tall_whitened_eigen(p: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda, T)``: the eigenvalues (descending) of ``W M W^T`` and ``T`` (``n x n``) with ``U = W T``.

    From ``P = W^T W`` and ``M`` alone (module docstring, tall layers): the same eigenpairs
    as :func:`whitened_eigen` of ``W``, with the same cut of directions ``sigma_l <= 1e-7
    sigma_1`` (their columns of ``T`` are zero).
    """
    lam, q = eigh_desc(0.5 * (m + m.T))
    s = q * lam.sqrt()
    sps = s.T @ p @ s
    evals, v = eigh_desc(0.5 * (sps + sps.T))
    sig = evals.sqrt()
    keep = sig > 1e-7 * sig[0] if sig[0] > 0 else torch.zeros_like(sig, dtype=torch.bool)
    t = (s @ v) / torch.where(keep, sig, torch.ones_like(sig))
    t[:, ~keep] = 0.0
    return torch.where(keep, evals, torch.zeros_like(evals)), t


def is_tall(weight: torch.Tensor, moment: torch.Tensor, groups: int, output: torch.Tensor | None = None) -> bool:
    """Whether the tall-layer (input-space) formulas apply: ``f > n/k``, a full moment and no output weighting."""
    f, n = weight.shape
    return output is None and moment.dim() == 2 and f > n // groups


def block_eigen(w: torch.Tensor, m: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`whitened_eigen` of each block ``W_i`` (``w``: ``(k, f, n/k)``) under its diagonal block ``M_ii``."""
    k, _, nk = w.shape
    if m.dim() == 1:
        return [whitened_eigen(w[0], m)]
    idx = torch.arange(nk)
    return [whitened_eigen(w[i], m[i * nk + idx][:, i * nk + idx]) for i in range(k)]


@torch.no_grad()
def whitened_basis(
    weight: torch.Tensor, moment: torch.Tensor, groups: int,
    output: torch.Tensor | None = None, output_damping: float = OUTPUT_DAMPING,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """``(W blocks, block_eigen, S^{-1} or None)``: the part of :func:`whitened_factors` that no rank changes.

    Not for tall layers (:func:`is_tall`), whose factors come from ``W^T W`` instead.
    """
    weight, inv = output_weighted(weight, output, output_damping)
    w, m = moment_blocks(weight, moment, groups)
    return w, block_eigen(w, m), inv


@torch.no_grad()
def whitened_factors(
    weight: torch.Tensor, moment: torch.Tensor, groups: int, rank: int,
    output: torch.Tensor | None = None, output_damping: float = OUTPUT_DAMPING,
    basis: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the per-group whitened truncation ``W_hat_i = U_ij U_ij^T W_i = B_i A_i``.

    ``U_ij``: the top ``rank`` eigenvectors of ``W_i M_ii W_i^T`` (:func:`whitened_eigen`).
    Same layout as :func:`grouped_low_rank_factors`: ``A`` is ``(groups, rank, n/groups)``
    and ``B`` is ``(groups, f, rank)``, float64.  The scale of each rank-one term is
    balanced between ``A`` and ``B`` (``||a_l|| = ||b_l||``), which leaves the product
    unchanged.  With an output moment ``output = G``: the factors of ``S W`` under ``M``,
    then ``B <- S^{-1} B`` (the two-sided truncation, module docstring).  ``basis``: the
    :func:`whitened_basis` of the same arguments, shared by several ranks of one layer.
    """
    if is_tall(weight, moment, groups, output):
        return _tall_whitened_factors(weight, moment, groups, rank)
    w, eig, inv = basis if basis is not None else whitened_basis(weight, moment, groups, output, output_damping)
    k, f, nk = w.shape
    if not 1 <= rank <= min(f, nk):
        raise ValueError(f"rank must be in [1, {min(f, nk)}] for a {f}x{nk} block, got {rank}")
    b = torch.stack([u[:, :rank] for _, u in eig])  # (k, f, rank), orthonormal (or zero) columns
    a = b.transpose(1, 2) @ w  # (k, rank, nk)
    if inv is not None:
        b = inv @ b
    return _balance(a, b)


def _balance(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` rescaled in place per rank-one term so that ``||a_l|| = ||b_l||`` (the product is unchanged)."""
    tiny = torch.finfo(torch.float64).tiny
    scale = (a.norm(dim=2) / b.norm(dim=1).clamp_min(tiny)).clamp_min(tiny).sqrt()  # (k, rank)
    return a.div_(scale.unsqueeze(2)), b.mul_(scale.unsqueeze(1))


def _tall_whitened_factors(weight: torch.Tensor, moment: torch.Tensor, groups: int,
                           rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`whitened_factors` of a tall ``W`` from ``P = W^T W`` (module docstring): ``B_i = W_i T_i``, ``A_i = T_i^T P_ii``."""
    check_blocks(weight, moment, groups)
    f, n = weight.shape
    nk = n // groups
    if not 1 <= rank <= min(f, nk):
        raise ValueError(f"rank must be in [1, {min(f, nk)}] for a {f}x{nk} block, got {rank}")
    p, m = column_gram(weight), moment.to(torch.float64)
    w = weight.detach()
    a = torch.empty(groups, rank, nk, dtype=torch.float64, device=w.device)
    b = torch.empty(groups, f, rank, dtype=torch.float64, device=w.device)
    for i in range(groups):
        sl = slice(i * nk, (i + 1) * nk)
        _, t = tall_whitened_eigen(p[sl, sl], m[sl, sl])
        t = t[:, :rank]
        a[i] = t.T @ p[sl, sl]
        rows_matmul(w[:, sl], t, out=b[i])
    return _balance(a, b)


@torch.no_grad()
def whitened_factors_cholesky(
    weight: torch.Tensor, moment: torch.Tensor, rank: int, damping: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM form of the whitened truncation (one group): ``W_hat = [W L]_j L^{-1}``.

    ``L = chol(M + delta * mean(diag M) * I)``; ``delta`` is raised tenfold until the
    factorisation succeeds.  Returns ``(A, B)`` with ``A = S^{1/2} V^T L^{-1}``
    (``rank x n``) and ``B = U S^{1/2}`` (``f x rank``).  The product equals
    :func:`whitened_factors` to rounding when ``M`` is well conditioned.
    """
    w = weight.detach().to(torch.float64)
    m = moment.to(torch.float64)
    n = m.shape[0]
    scale = float(m.diagonal().mean()) or 1.0
    delta = damping
    for _ in range(12):
        lower, info = torch.linalg.cholesky_ex(m + delta * scale * torch.eye(n, dtype=torch.float64))
        if int(info) == 0:
            break
        delta *= 10
    else:  # pragma: no cover - M is symmetric PSD, so some damping always works
        raise RuntimeError("Cholesky factorisation of the input moment failed even with heavy damping")
    u, s, vh = torch.linalg.svd(w @ lower, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    # A = S^{1/2} V^T L^{-1}:  solve A L = S^{1/2} V^T  <=>  L^T A^T = (S^{1/2} V^T)^T
    a = torch.linalg.solve_triangular(lower.T, (root.unsqueeze(1) * vh[:rank]).T, upper=True).T
    return a, b
