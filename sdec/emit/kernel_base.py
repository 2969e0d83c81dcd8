"""Shared numerical core of every compiled sdec diffusion.

A generated subclass supplies hooks (``_beta``, ``_B``, ``_blocks``, ``_phi_closed``,
buffers ``_sigma_inf`` and ``_aux_init_cov``); this base class derives from them the
transition kernel, perturbation, prior, ELBO terms and the importance time sampler.

Numerics.  With A = -(Q + D) Σ∞⁻¹ the drift is F(t) = beta(t) A and the noise covariance
G Gᵀ(t) = 2 beta(t) D, so everything is a function of s = B(t):

    Φ(s) = expm(s A),   dΣ/ds = A Σ + Σ Aᵀ + 2 D,   Σ(0) = Σ0.

All K x K algebra runs in float64; results are cast to the caller's dtype.  Σ(s) has two
evaluation branches, chosen per element of s:

* small s (s ||A||₂ <= _SERIES_TAU): the exact Taylor series about s = 0,
  Σ = Σ_k s^k/k! N_k with N_0 = Σ0, N_1 = A Σ0 + Σ0 Aᵀ + 2D, N_{k+1} = A N_k + N_k Aᵀ, and
  Φ = Σ_k s^k/k! A^k.  Structural zeros of the coefficients stay exactly zero, so the tiny
  entries of Σ at small t (CLD Σ_xx ~ s³, third-order processes ~ s⁵) keep full relative
  accuracy.  With ||N_k|| <= (2||A||)^k the tail after _SERIES_TERMS terms is below
  (2 tau)^n / n! ~ 2e-24 relative; rounding is below e^{2 tau} eps ~ 1e-13.
* large s: scaling and squaring, with no cancellation: the series at h = s / 2^j (j the
  smallest with h ||A||₂ <= tau, each element's own: every extra doubling adds rounding, and
  with the batch's largest j a stiff process (||A||₂ = 2925) lost 5.8e-10 in Σ's own scale)
  gives E(h) = Φ(h) - I (its series without the k = 0 term) and the noise part Σn(h)
  (Σ0 = 0), then j doublings E ← 2 E + E E (Φ ← Φ Φ), Σn ← Σn + Φ Σn Φᵀ (a sum of PSD terms)
  and Σ = Φ Σ0 Φᵀ + Σn with Φ = I + E, or Φ from ``_phi_closed`` where the lowering found
  one.  Doubling E, not Φ: where a direction decays slowly over h, Φ(h) = I + E rounds E's
  digits away and every squaring of Φ doubles the loss (a stiff spectrum, eigenvalues -4.5e6
  and -0.036: Σ(0.25) 2.5e-10 off in its own scale after 19 squarings of Φ, 3.4e-11 with E).
  Against a 50-digit Van Loan reference (CLD, ALDA, MALDA, learned K = 2, 3; hybrid and
  not; s from the switch to B(T)) the worst error in Σ's own scale max|L⁻¹(Σ - Σ_ref)L⁻ᵀ|
  is 2.4e-15 (the stationary identity
  Σ∞ + Φ (Σ0 - Σ∞) Φᵀ used before gave 2.6e-14 at s||A|| = 3, 1.3e-13 at 2).  The series
  alone stays below the switch: it is what keeps hybrid ALDA at t = 1e-5 at its float64
  representation floor (below), where Φ Σ0 Φᵀ + Σn rounds an order of magnitude worse.
Each doubling also carries an error d of E on as d Φ + Φ d, so the chain's float64 rounding
grows by up to ∏ 2‖Φ_l‖ (2^j u, u = 2^-53, where a direction barely decays: 1.5e-10 in Φ
after 20 doublings of a K = 6 spec; 1.5e-8 after 11 of a non-normal K = 4 one): the native
pipeline measures that growth and runs such an element again in double-double
(kernel_native.c, needs_dd), rounding once; this torch path stays in float64.
Both series are summed from coefficients formed from A / a and D / a, a = 2^e just above
||A||₂, with weights (a s)^k / k! (_series_scale): exact, the same doubles term by term, and
A^k cannot overflow (it did past ||A||₂ ≈ 2e6).
One j serves the whole batch (from B(T) when the times are known to lie in [0, T], so no
host sync), both branches run on every element, each in one product with the stacked series
coefficients, and torch.where picks per element, so gradients reach only the branch an
element uses.  With tau = 3 the series error is 1.3e-14 (2e-13 at 5).

Limit: a float64 matrix cannot hold every Σ.  Hybrid third-order processes (ALDA) have a
direction of variance ~s⁵ next to entries ~s² (v0 enters x at order s), so even the
correctly rounded Σ is off by 5e-6 in its own scale at t = 1e-3 and is indefinite at 1e-5.

K = 1 has a closed form at every s (``_scalar``).

Speed.  On the CPU, K > 1, Φ, Σ, L = chol Σ, L⁻¹ and log det Σ of a batch come from the
native pipeline (kernel_native: the same method in C, its exact adjoint in one backward call;
its squared Φ also where the lowering found a closed form, which it matches to 1.1e-15 on
CLD and which costs more ops than the whole native call), and float32 state applies with
K >= 2 are one native pass over the data (perturb(with_score=True): y and the score in one
pass over ε, as the ELBO asks).  There an elbo() call is a handful of graph nodes, each one
C call forward and one backward: the process side (Φ's first column, L, -L⁻ᵀ and G Gᵀ at the
batch's times and the parameter-only terms, from one pipeline call over the batch's times,
t_min and T, with the perturbation and its score in the same node for float32 data:
native_elbo_kernels; elsewhere perturb's _PairApply), and the score's quadratic form with the
per-example terms and their total (_Terms, native_terms); the importance table is one C call
too (native_rate_table), and a training step with importance times gets the table, the
parameter map's values and the series settings from a single call (_prepare).  A training
step's backward walks these (a learned spec's parameter map folded into the first: its adjoint
runs in that node's backward), not about eighty K x K nodes: each node costs tens of µs of
autograd and dispatch, more than its arithmetic.
Elsewhere (GPU, no C compiler, SDEC_NATIVE=0):
for K <= _UNROLL_K the state applies (y = Φ x + L ε, the score -L⁻ᵀ ε) are explicit
multiply-adds, one op per diagonal of the matrix (zero triangles skipped); the Cholesky
factors and triangular inverses of up to _LAPACK_MAX_N matrices come from LAPACK (one call
each, with autograd's backward), of more (the importance table's bin edges) entry by entry
across the batch.  ``perturb`` computes the mean, the score and L⁻ᵀ only when they are read.
No jitter is ever added: a failed Cholesky factorisation raises CholeskyError.

Caching.  Quantities that do not depend on the batch (A, D, the series coefficients, the
score-norm integral, the importance-sampling table) are cached while no gradient into the
module's parameters is needed; when one is (grad enabled and a parameter requires grad)
they are rebuilt on every call, except that one ``elbo`` call builds each of them once, and
evaluates Φ, Σ and one Cholesky factorisation once for all the times it needs (the batch's,
t_min and T), shared by the perturbation, the score, the score norm and the prior term.
Exception: while a gradient is needed, the importance table is reused for up to
``table_refresh`` parameter versions (see _time_table); it stays an exact proposal.
What depends on the buffers Σ∞ and Σ_aux alone (Σ∞⁻¹, log det Σ∞, the aux entropy) is held
across parameter versions (_constants), keyed on copies of those two buffers.  The cache holds a copy of every parameter and buffer
(name, dtype, device, shape and values) and T, and each lookup compares the module's
current state with it, so no way of writing a parameter can serve stale numbers: writes
through ``.data`` or a numpy view, replaced Parameters, ``load_state_dict``, optimizer
steps (fused ones included), ``vector_to_parameters`` and ``.to()`` are all seen.  The tensors are K x K: a
cache hit costs about 10 µs on a CPU, no more than reading version counters did.

Identity.  ``spec_hash`` (a class attribute of generated modules) is the canonical hash of
the spec, insensitive to formatting and comments; ``sdec.compile`` also sets ``spec_text``
on the instance, the spec's source text, so a process can be rebuilt from a checkpoint with
``sdec.compile_text``.  Both are None where unknown (a hand-written subclass; a standalone
file's class instantiated directly has ``spec_hash`` but no ``spec_text``).
``Q`` and ``D`` are the current K x K float64 matrices, as detached copies.
"""
import math
import torch

from .kernel_native import (native_apply, native_apply2, native_apply2_ok,  # package only
                            native_elbo_kernels, native_gram,  # package only
                            native_gram_form_backward, native_kernels, native_library,  # package only
                            native_norm2, native_pair_grads, native_pair_ok,  # package only
                            native_param_map, native_param_values, native_prepare,  # package only
                            native_rate_table, native_terms,  # package only
                            native_terms_backward,  # package only
                            native_terms_ok)  # package only: generated modules carry it inline

_SERIES_TAU = 3.0      # branch switch: series while s * ||A||_2 <= tau (measured crossover)
_SERIES_TERMS = 48     # (2 tau)^48 / 48! ~ 1.8e-24: truncation far below float64 rounding
_TABLE_BINS = 128      # importance sampler: geometric bins over [t_min, T] (see _build_table)
_TIME_SAMPLERS = ("uniform", "importance", "stratified")
_UNROLL_K = 4          # K x K applies up to this K are explicit per-entry multiply-adds
_LAPACK_MAX_N = 256    # Cholesky / L⁻¹ of up to this many K x K by LAPACK, more entrywise (K <= 4);
                       # measured, K = 3, forward + backward: 128 matrices 0.70 vs 1.55 ms, 512 even, 2048 5.2 vs 2.4


class CholeskyError(RuntimeError):
    """Σ_t is not numerically positive definite (usually t is too close to 0)."""


class Perturbed:
    """y_t ~ q(y_t | x): y = mean + chol @ eps, score = -chol⁻ᵀ eps (the target score).

    ``mean`` and ``score`` may be given as zero-argument callables: they are then computed on
    first access (a training loss that needs only y and eps never pays for them)."""

    __slots__ = ("y", "eps", "chol", "_mean", "_score")

    def __init__(self, y, eps, mean, chol, score):
        self.y, self.eps, self.chol, self._mean, self._score = y, eps, chol, mean, score

    @property
    def mean(self):
        if callable(self._mean):
            self._mean = self._mean()
        return self._mean

    @property
    def score(self):
        if callable(self._score):
            self._score = self._score()
        return self._score


class ELBOTerms:
    """Per-example ELBO terms in nats; ``total`` is their sum (an unbiased bound estimate)."""

    TERMS = ("prior", "score", "score_norm", "divergence", "truncation", "aux_entropy")

    def __init__(self, prior, score, score_norm, divergence, truncation, aux_entropy,
                 t, weight, total=None):
        self.prior, self.score, self.score_norm = prior, score, score_norm
        self.divergence, self.truncation, self.aux_entropy = divergence, truncation, aux_entropy
        if total is None:  # given: the same sum, formed by the caller (kernel_base._Terms)
            total = prior + score + score_norm + divergence + truncation + aux_entropy
        self.total = total
        self.t, self.weight = t, weight

    def as_dict(self):
        keys = self.TERMS + ("total", "t", "weight")
        return {k: getattr(self, k) for k in keys}

    def __repr__(self):
        means = ", ".join(f"{k}={float(getattr(self, k).mean()):.6g}"
                          for k in self.TERMS + ("total",))
        return f"ELBOTerms({means})"


# sdec.compile runs this file with ``_SDEC_SHARED`` preset to the classes above as defined
# once in sdec.emit.kernel_base, so ``except sdec.CholeskyError`` and
# ``isinstance(terms, sdec.ELBOTerms)`` hold for every module it returns. A standalone file
# keeps its own classes (and needs only torch).
if "_SDEC_SHARED" in globals():
    CholeskyError, Perturbed, ELBOTerms = _SDEC_SHARED  # noqa: F821 - preset by the loader


def _col(c, like):
    """A per-example (B,) or scalar coefficient shaped to broadcast against like (B, *data)."""
    return c.reshape(c.shape + (1,) * (like.dim() - c.dim()))


def _apply(mat, y, tri=None, col=None, x=None):
    """mat @ y per coordinate, for (B, K, K) or (K, K) mat and states y (B, K, *data_shape),
    plus col[..., i] * x in row i when col (B, K) and x (B, *data_shape) are given (the hybrid
    mean Φ[:, :, 0] x).  tri = "lower" / "upper" skips the zero triangle of mat.

    For K <= _UNROLL_K the product is explicit multiply-adds, one op per nonzero diagonal of
    mat (written in place when no graph is needed; see _apply_unrolled): a batched
    torch.matmul with so small a K costs more than these passes.  Larger K use torch.matmul."""
    K = y.shape[1]
    if K > _UNROLL_K:
        out = torch.matmul(mat, y.reshape(y.shape[0], K, -1)).reshape(y.shape)
        return out if col is None else out + _col(col, y) * x[:, None]
    parts = [v for v in (mat, y, col, x) if v is not None]
    if torch.is_grad_enabled() and any(v.requires_grad for v in parts):
        return _SmallApply.apply(mat, y, col, x, tri)
    return _apply_unrolled(mat, y, tri, col, x)


def _apply_unrolled(mat, y, tri, col, x):
    """The no-graph body of _apply for K <= _UNROLL_K, one diagonal of mat at a time: the main
    diagonal scales every row in one pass, col x is added to every row in one pass, and the
    k-th sub- (super-) diagonal adds mat[i, i -+ k] y[i -+ k] to rows k.. (..K-k) in one pass;
    a zero triangle's diagonals are skipped.  2 + (K - 1) ops for a triangle instead of one
    per entry, with the same passes over the data."""
    K = y.shape[1]
    ones = (1,) * (y.dim() - 2)
    if K == 1 and (col is None or col.dtype == x.dtype == y.dtype == mat.dtype):
        # (VP): one multiply and one multiply-add; mixed dtypes take the general path below
        out = torch.mul(y, mat.reshape(mat.shape[:-2] + (1,) + ones))
        return out if col is None else out.addcmul_(x[:, None], col.reshape(col.shape + ones))
    out = native_apply(mat, y, tri, col, x)
    if out is not None:
        return out
    dtype = mat.dtype
    for v in (y, col, x):
        if v is not None:
            dtype = torch.promote_types(dtype, v.dtype)

    def diag(k):  # mat's k-th diagonal shaped to broadcast against y[:, rows]
        d = torch.diagonal(mat, k, -2, -1)
        return d.reshape(d.shape[:-1] + (K - abs(k),) + ones)

    out = torch.empty(y.shape, dtype=dtype, device=y.device)
    torch.mul(y, diag(0), out=out)
    if col is not None:
        out.addcmul_(x[:, None], col.reshape(col.shape + ones))
    for k in range(1, K):
        if tri != "upper":
            out[:, k:].addcmul_(y[:, :K - k], diag(-k))
        if tri != "lower":
            out[:, :K - k].addcmul_(y[:, k:], diag(k))
    return out


class _SmallApply(torch.autograd.Function):
    """_apply with a graph (K <= _UNROLL_K): the forward is the in-place unrolled one; the
    backward reduces each input's gradient in one batched product, where autograd through
    the per-entry ops would add a full-size multiply and a reduction for every entry:
    d mat = g yᵀ per example (its zero triangle dropped), d col = g xᵀ, d y = matᵀ g,
    d x = Σ_i col_i g_i."""

    @staticmethod
    def forward(ctx, mat, y, col, x, tri):
        ctx.tri = tri
        ctx.save_for_backward(mat, y, col, x)
        return _apply_unrolled(mat, y, tri, col, x)

    @staticmethod
    def backward(ctx, g):
        mat, y, col, x = ctx.saved_tensors
        tri = ctx.tri
        n, K = g.shape[0], g.shape[1]
        gf = g.reshape(n, K, -1)
        d_mat = d_y = d_col = d_x = None
        if ctx.needs_input_grad[0]:
            d_mat = native_gram(g, y, tri)  # one pass, only the triangle (float32 CPU), or:
            if d_mat is None:
                d_mat = gf @ y.reshape(n, K, -1).to(g.dtype).mT
                d_mat = d_mat.tril() if tri == "lower" else d_mat.triu() if tri == "upper" else d_mat
            d_mat = (d_mat if mat.dim() == 3 else d_mat.sum(0)).to(mat.dtype)
        if ctx.needs_input_grad[1]:
            flip = {"lower": "upper", "upper": "lower"}.get(tri)
            d_y = _apply(mat.mT.to(g.dtype), g, flip).to(y.dtype)
        if ctx.needs_input_grad[2]:
            # as x gᵀ, (n, 1, N) @ (n, N, K): 5x cheaper than g x, (n, K, N) @ (n, N, 1), at N = 3072
            d_col = (x.reshape(n, 1, -1).to(g.dtype) @ gf.mT).squeeze(1).to(col.dtype)
        if ctx.needs_input_grad[3]:
            d_x = (_col(col.to(g.dtype), g) * g).sum(1).to(x.dtype)
        return d_mat, d_y, d_col, d_x, None


def _apply_pair(L, U, col, x, eps):
    """(L eps + col x, U eps) for the perturbation and its score, L lower and U upper (B, K, K),
    in one native pass over eps (see native_apply2), or None where the two _apply calls must
    run (not float32 on the CPU, K = 1, no library, or a graph into x or eps)."""
    if not native_apply2_ok(L, U, col, x, eps):
        return None
    if torch.is_grad_enabled() and (L.requires_grad or U.requires_grad or col.requires_grad):
        return _PairApply.apply(L, U, col, x, eps)
    return native_apply2(L, U, col, x, eps)


class _PairApply(torch.autograd.Function):
    """_apply_pair with a graph into L, U and col (x and eps are constants): the native pass
    forward; backward d L = tril(gy epsᵀ) and d U = triu(gs epsᵀ) in one pass over eps, and
    d col = gy xᵀ as in _SmallApply (native_pair_grads), so every gradient equals the two
    _SmallApply calls'.  (The fused ELBO node forms d L and d U the same way inside its
    backward's C call, and d col by its own float32 sums.)"""

    @staticmethod
    def forward(ctx, L, U, col, x, eps):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(L, U, col, x, eps)
        return native_apply2(L, U, col, x, eps)

    @staticmethod
    def backward(ctx, gy, gs):
        L, U, col, x, eps = ctx.saved_tensors
        return (*native_pair_grads(x, eps, gy, gs, ctx.needs_input_grad[:3]), None, None)


def _gram_form(diff, GG):
    """Σ_ij GG[:, i, j] <diff[:, i], diff[:, j]> per example, for diff (n, K, N) and GG (n, K, K):
    one K x K Gram matrix per example (a reduction over the data).  With a graph, from one
    native pass where it runs (float32 on the CPU) and _GramForm's one-call backward (autograd
    through the batched product costs two bmm); without one, the batched product (as fast at
    K = 3, faster at K = 1: 42 vs 63 µs at N = 64)."""
    if torch.is_grad_enabled() and (diff.requires_grad or GG.requires_grad) and GG.dtype == diff.dtype:
        gram = native_gram(diff, diff)
        if gram is not None:
            return _GramForm.apply(diff, GG, gram)
    return (torch.matmul(diff, diff.mT) * GG).sum((1, 2))


class _GramForm(torch.autograd.Function):
    """_gram_form with a graph, from the native Gram matrix: its backward d diff = (g (GG + GGᵀ))
    diff per example and d GG = g gram is one C call (batched products would cost two bmm)."""

    @staticmethod
    def forward(ctx, diff, GG, gram):
        ctx.save_for_backward(diff, GG, gram)
        return (gram * GG).sum((1, 2))

    @staticmethod
    def backward(ctx, g):
        diff, GG, gram = ctx.saved_tensors
        d_diff, d_GG = native_gram_form_backward(g, GG, gram, diff, ctx.needs_input_grad[1])
        return d_diff, d_GG, None


class _Terms(torch.autograd.Function):
    """The per-example ELBO terms of the fused path as one graph node (about twenty small
    nodes otherwise), from its five scalars (native_elbo_kernels: the prior's constant and
    quadratic, the score norm, divergence and truncation), the model's and the target's
    scores (n, K, ...) (or target None and model the difference (n, K, N)), G Gᵀ at the
    batch's times, and the constants x (sq = |x|² per example), weight and the aux entropy
    (a float, returned per example as the last output):
    diff = model - target, q = Σ_ij GG_ij <diff_i, diff_j> (_gram_form's arithmetic),
    prior = const - ½ quad sq, score = -½ weight q, the three scalars per example, and
    total = prior + score + score_norm + divergence + truncation + aux (ELBOTerms' order).
    In float32 on the CPU forward and backward are one C call each (native_terms)."""

    @staticmethod
    def forward(ctx, scalars, model, target, GG, x, weight, aux_value):
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.native = model.shape, native_terms_ok(model, target, GG) and x.dtype == torch.float32
        if ctx.native:
            diff, gram, sq, outs = native_terms(scalars, model, target, GG, x, weight, aux_value)
            ctx.save_for_backward(diff, GG, gram, sq, weight)
            ctx.mark_non_differentiable(outs[6])
            return outs
        n, K = GG.shape[0], GG.shape[1]
        diff = model if target is None else (model - target).reshape(n, K, -1)
        gram = torch.matmul(diff, diff.mT)
        sq = (x * x).reshape(n, -1).sum(1)
        const, quad, norm, div, trunc = scalars.unbind()
        ones = torch.ones_like(sq)
        aux = torch.full_like(sq, aux_value)
        prior, score = const - 0.5 * quad * sq, -0.5 * weight * (gram * GG).sum((1, 2))
        norm, div, trunc = norm * ones, div * ones, trunc * ones
        ctx.save_for_backward(diff, GG, gram, sq, weight)
        ctx.mark_non_differentiable(aux)
        return prior, score, norm, div, trunc, prior + score + norm + div + trunc + aux, aux

    @staticmethod
    def backward(ctx, *grads):
        grads = grads[:6]  # aux has none
        diff, GG, gram, sq, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        want_diff = grads[1] is not None or grads[5] is not None
        if ctx.native:
            d_scalars, d_diff, d_GG = native_terms_backward(
                grads, diff, GG, gram, sq, weight, need[0], want_diff and (need[1] or need[2]),
                not need[1], want_diff and need[3])
            d_model = d_diff.reshape(ctx.shape) if d_diff is not None and need[1] else None
            d_target = None
            if d_diff is not None and need[2]:
                d_target = (d_diff if not need[1] else -d_diff).reshape(ctx.shape)
            return d_scalars, d_model, d_target, d_GG, None, None, None
        total = grads[5]
        g = [total if gi is None else gi if total is None else gi + total for gi in grads[:5]]
        d_scalars = d_model = d_target = d_GG = None
        if need[0]:
            zero = sq.new_zeros(())
            sums = [zero if gi is None else gi.sum() for gi in g]
            quad = zero if g[0] is None else -0.5 * (g[0] * sq).sum()
            d_scalars = torch.stack([sums[0], quad, sums[2], sums[3], sums[4]])
        if g[1] is not None and (need[1] or need[2] or need[3]):  # q's gradient, as _GramForm's
            gq = (-0.5 * weight * g[1])[:, None, None]
            d_diff = torch.matmul(gq * (GG + GG.mT), diff)
            d_GG = gq * gram if need[3] else None
            if need[1]:
                d_model = d_diff.reshape(ctx.shape)
            if need[2]:
                d_target = -d_diff.reshape(ctx.shape)
        return d_scalars, d_model, d_target, d_GG, None, None, None


def _cholesky_small(S):
    """Cholesky factors of (n, K, K) symmetric matrices for K <= _UNROLL_K, entry by entry and
    vectorised over n: the recurrences of LAPACK's unblocked potf2, without a per-matrix
    call (or its per-matrix backward).  A fixed ~30 small ops whatever n, so it is cheaper than
    LAPACK only for large n (see _LAPACK_MAX_N).  Returns (L, ok), ok False where a pivot is
    not > 0."""
    K = S.shape[-1]
    E = _entries(S)
    L = [[None] * K for _ in range(K)]
    ok = None
    for j in range(K):
        d = E[j][j]
        for k in range(j):
            d = d - L[j][k] * L[j][k]
        ok = d > 0 if ok is None else ok & (d > 0)
        L[j][j] = torch.sqrt(d)
        for i in range(j + 1, K):
            v = E[i][j]
            for k in range(j):
                v = v - L[i][k] * L[j][k]
            L[i][j] = v * (1.0 / L[j][j])
    return _stack_lower(L, S), ok


def _tri_inverse_small(L):
    """L⁻¹ of (n, K, K) lower-triangular L with a positive diagonal (K <= _UNROLL_K), by
    forward substitution entry by entry, vectorised over n."""
    K = L.shape[-1]
    E = _entries(L)
    M = [[None] * K for _ in range(K)]
    for j in range(K):
        M[j][j] = 1.0 / E[j][j]
        for i in range(j + 1, K):
            v = E[i][j] * M[j][j]
            for k in range(j + 1, i):
                v = v + E[i][k] * M[k][j]
            M[i][j] = -v / E[i][i]
    return _stack_lower(M, L)


def _entries(mat):
    """mat[..., i, j] as nested lists, by two levels of unbind (one backward node each, where
    K² separate selects would each allocate a full-size gradient)."""
    return [row.unbind(-1) for row in mat.unbind(-2)]


def _stack_lower(entries, like):
    K = len(entries)
    zero = like.new_zeros(like.shape[:-2])
    return torch.stack([torch.stack([entries[i][j] if j <= i else zero for j in range(K)], -1)
                        for i in range(K)], -2)


def _own_doublings(s, radius, j):
    """Each element's doublings (long tensor): the fewest ji with |s| 2^-ji <= radius, at most
    j (the batch's): the module doc's "large s" (the native pipeline's doublings())."""
    top = s.abs() / radius
    ji = torch.ceil(torch.log2(torch.clamp(top, min=1.0))).long()
    ji = ji + (torch.ldexp(s.abs(), -ji) > radius).long()  # log2's rounding, at a power of 2
    return ji.clamp(0, j)


def _series_scale(norm):
    """a = 2^e with norm = f 2^e, f in [0.5, 1) (1 where norm is 0 or not finite).  The series
    coefficients are formed from A / a and D / a, so their k-th is the unscaled one over a^k,
    and weighted by (a s)^k / k!: scaling by a power of two is exact, so each term is the same
    double as unscaled, but A^k cannot overflow (||A||_2 above about 2e6: a condition number
    of Σ∞ near 1e7 gives that) or underflow (a small ||A||_2)."""
    if not (norm > 0 and math.isfinite(norm)):
        return 1.0
    return math.ldexp(1.0, math.frexp(norm)[1])


def _taylor_weights(s, n):
    """(m, n) matrix of s^k / k!, k = 0..n-1, by a running product (safe at s = 0)."""
    k = torch.arange(1, n, dtype=s.dtype, device=s.device)
    steps = torch.cat([torch.ones_like(s)[:, None], s[:, None] / k], dim=1)
    return torch.cumprod(steps, dim=1)


def _power_stack(M, n):
    """M^0 .. M^{n-1}, (n, m, m), by doubling: ceil(log2 n) batched products, not n - 1
    sequential ones.  An entry that is structurally zero (no path of that length in the
    graph of M) is a sum of products with an exact-zero factor, so it stays exactly zero."""
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    P = torch.stack([eye, M])
    while P.shape[0] < n:  # M^(m+k) = M^k M^m: (m, K, K) @ (K, K) folds into one mm
        P = torch.cat([P, P @ (P[-1] @ M)])
    return P[:n]


def _series_coefficients(A, D, S0, n):
    """A^k and N_k (k < n): Φ = Σ s^k/k! A^k, Σ = Σ s^k/k! N_k.  N_{k+1} = A N_k + N_k Aᵀ is
    the linear map kron(A, I) + kron(I, A) on row-major vec(N_k), so N_k = that map^(k-1)
    applied to N_1, and both stacks come from _power_stack.  S0 may be a stack (r, K, K) of
    starts: moments is then (r, n, K, K), every start sharing the one power stack."""
    K = A.shape[-1]
    eye = torch.eye(K, dtype=A.dtype, device=A.device)
    AS0 = A @ S0
    N1 = AS0 + AS0.mT + 2.0 * D
    lyap = torch.kron(A, eye) + torch.kron(eye, A)
    # one power stack of blockdiag(A, lyap): its blocks are the powers of each (the zero
    # blocks add exact zeros), in half the products and graph nodes of two stacks
    P = _power_stack(torch.block_diag(A, lyap), n)
    later = (P[:n - 1, K:, K:] @ N1.reshape(-1, K * K).mT).permute(2, 0, 1)
    later = later.reshape(S0.shape[:-2] + (n - 1, K, K))
    moments = torch.cat([S0.unsqueeze(-3), 0.5 * (later + later.mT)], -3)
    return P[:, :K, :K], moments


def _map_state(inputs, S):
    """c["map"]: what the fused ELBO node needs of the native map to run its adjoint, (entries,
    -P, S, raw parameters), from _native_map_inputs' tuple and the factor S its values came with."""
    entries, _, _, negP, theta = inputs
    return entries, negP, S, theta


def _detached(value):
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


class DiffusionBase(torch.nn.Module):
    """A linear diffusion dy = beta(t) A y dt + sqrt(2 beta(t)) D^{1/2} dW (see module doc)."""

    names = ()
    T = 1.0
    t_min = 1e-3
    noised = ()
    spec_hash = None   # canonical hash of the spec (generated classes set it)
    spec_text = None   # the spec's source text (sdec.compile sets it on the instance)
    # While a gradient into the parameters is needed (training), the importance table is
    # rebuilt once every table_refresh parameter versions (1: after every change); see
    # _time_table.  Evaluation (no gradient needed) always uses the current parameters' table.
    # Default 1: a held table lives only in memory, so with more a resumed run would draw
    # other times than an uninterrupted one (the runtime's resume is bit-identical).
    table_refresh = 1

    def __init__(self):
        super().__init__()
        self._cache = {}
        self._call_memo = None   # a dict while one elbo() call runs (see _cached)
        self._versions = 0       # parameter/buffer states seen so far (see _sync_state)
        self._held_tables = {}   # t_min -> (table, T, device, version built at): _time_table
        self._held_constants = None  # (copies of Σ∞ and Σ_aux, values): _constants
        self._indices = {}       # (values, device) -> long tensor: _index

    # ----------------------------------------------------------------- hooks
    def _beta(self, t):
        raise NotImplementedError("generated subclass must define _beta(t)")

    def _B(self, t):
        raise NotImplementedError("generated subclass must define _B(t)")

    def _blocks(self):
        raise NotImplementedError("generated subclass must define _blocks() -> (Q, D)")

    def _phi_closed(self, s):
        return None

    def _D_sqrt(self):
        """Symmetric square root of D.  Eigenvalues are clamped at 0: this only removes
        rounding (-1e-17 for a PSD D), it is not jitter.  Not differentiable at singular D."""
        lam, V = torch.linalg.eigh(self._blocks()[1].to(torch.float64))
        return (V * lam.clamp(min=0.0).sqrt()[None, :]) @ V.mT

    # ---------------------------------------------------------------- caching
    def _needs_graph(self):
        if not torch.is_grad_enabled():
            return False
        memo = getattr(self, "_call_memo", None)  # within one elbo() call: looked up once
        if memo is None:
            return self._param_grad()
        if "_param_grad" not in memo:
            memo["_param_grad"] = self._param_grad()
        return memo["_param_grad"]

    def _param_grad(self):
        """Whether some parameter requires a gradient (the module's own dict where it has no
        submodules: parameters()' generator costs more than the test)."""
        params = self.parameters() if self._modules else self._parameters.values()
        return any(p is not None and p.requires_grad for p in params)

    def _state_tensors(self):
        """(name, tensor) of every parameter and buffer."""
        if self._modules:
            return [*self.named_parameters(), *self.named_buffers()]
        return ([(k, v) for k, v in self._parameters.items() if v is not None]
                + [(k, v) for k, v in self._buffers.items() if v is not None])

    def _snapshot(self):
        """What cached values are built from: T and a copy of every parameter and buffer."""
        with torch.no_grad():  # a clone without a graph, one op per tensor
            return self.T, [(name, v.clone()) for name, v in self._state_tensors()]

    def _unchanged_since(self, snapshot):
        """True iff T and every parameter and buffer (name, dtype, device, shape and values)
        still equal the snapshot.  Values compare with torch.equal: a NaN never equals
        itself (so nothing is cached while a parameter is NaN), and -0.0 equals 0.0, which
        no computation here tells apart."""
        T, saved = snapshot
        current = self._state_tensors()
        if T != self.T or len(current) != len(saved):
            return False
        for (name, v), (saved_name, s) in zip(current, saved):
            if (name != saved_name or v.dtype != s.dtype or v.device != s.device
                    or v.shape != s.shape or not torch.equal(v, s)):
                return False
        return True

    def _cached(self, key, build, graph=True):
        """build() once per module state (compared by value, see the module doc).  While a
        graph into the parameters is needed (graph=True) it is rebuilt on every call, except
        within one elbo() call, which builds each value once (the parameters cannot change
        inside the call) and shares it between the perturbation, the score and the score norm."""
        memo = getattr(self, "_call_memo", None)
        if graph and self._needs_graph():
            if memo is None:
                return build()
            if key not in memo:
                memo[key] = build()
            return memo[key]
        if graph and memo is not None and key in memo:
            # within one elbo() call, a no-grad use (the importance table) of a value this
            # call already built with its graph: the same numbers, detached
            return _detached(memo[key])
        self._sync_state()
        if key not in self._cache:
            if graph:
                self._cache[key] = build()
            else:
                with torch.no_grad():
                    self._cache[key] = build()
        return self._cache[key]

    def _sync_state(self):
        """Start a new cache (and count a new version) when T or any parameter or buffer
        differs from the cache's snapshot.  Within one elbo() call the state is compared
        once: the parameters cannot change inside the call (the memo relies on it too)."""
        memo = getattr(self, "_call_memo", None)
        if memo is not None and memo.get("_synced") is self._cache:
            return
        if "_state" not in self._cache or not self._unchanged_since(self._cache["_state"]):
            self._cache = {"_state": self._snapshot()}
            self._versions = getattr(self, "_versions", 0) + 1
        if memo is not None:
            memo["_synced"] = self._cache

    # ------------------------------------------------------- basic quantities
    @property
    def K(self):
        return len(self.names)

    @property
    def Q(self):
        """The current skew-symmetric Q, (K, K) float64 (a detached copy)."""
        return self._blocks64()[0].clone()

    @property
    def D(self):
        """The current positive semi-definite D, (K, K) float64 (a detached copy)."""
        return self._blocks64()[1].clone()

    def _blocks64(self):
        return self._cached("blocks", lambda: tuple(m.to(torch.float64) for m in self._blocks()),
                            graph=False)

    @property
    def stationary_cov(self):
        return self._sigma_inf.to(torch.float64)

    @property
    def aux_init_cov(self):
        return self._aux_init_cov.to(torch.float64)

    def _device(self):
        return self._sigma_inf.device

    def _index(self, values):
        """Long index tensor on the module's device (used by generated learnable blocks), made
        once per (values, device): a constant of the generated code."""
        key = (values, self._device())
        indices = self.__dict__.setdefault("_indices", {})
        if key not in indices:
            indices[key] = torch.tensor(values, dtype=torch.long, device=key[1])
        return indices[key]

    def _constants(self):
        """What depends on the buffers Σ∞ and Σ_aux alone, built together once per value of
        those buffers: P = Σ∞⁻¹ (symmetric, from its Cholesky factor), -P, log det Σ∞ and the
        aux entropy per data dimension (both also as floats, for the C calls).  The parameters change at every training step, and
        _cached would rebuild these with them.  Like _cached, it keeps copies of both buffers
        (dtype, device, shape and values) and compares them on every lookup (once per elbo()
        call), so any way of writing a buffer (.data, load_state_dict, .to(), in place) is seen."""
        memo = getattr(self, "_call_memo", None)
        if memo is not None and "_constants" in memo:
            return memo["_constants"]
        sources = (self._sigma_inf, self._aux_init_cov)
        if any(v.requires_grad for v in sources):  # a graph into a buffer: hold nothing
            value = self._build_constants()
        else:
            held = self.__dict__.get("_held_constants")
            if held is None or not all(
                    v.dtype == c.dtype and v.device == c.device and v.shape == c.shape and torch.equal(v, c)
                    for v, c in zip(sources, held[0])):
                with torch.no_grad():
                    held = self._held_constants = (tuple(v.clone() for v in sources), self._build_constants())
            value = held[1]
        if memo is not None:
            memo["_constants"] = value
        return value

    def _build_constants(self):
        Sinf = self.stationary_cov
        Linf = torch.linalg.cholesky(Sinf)
        P = torch.cholesky_inverse(Linf)
        P = 0.5 * (P + P.mT)
        aux = torch.zeros((), dtype=torch.float64, device=Sinf.device)
        if self.K > 1:
            aux = (0.5 * (self.K - 1) * (1.0 + math.log(2 * math.pi))
                   + 0.5 * torch.linalg.slogdet(self.aux_init_cov)[1])
        log_det_inf = 2.0 * torch.log(Linf.diagonal()).sum()
        return {"P": P, "-P": -P, "log_det_inf": log_det_inf, "aux_entropy": aux,
                "floats": (float(log_det_inf), float(aux)),  # as floats, for the fused path's C calls
                ("S0", True): self._sigma0(True), ("S0", False): self._sigma0(False)}

    def _A_D(self):
        """(A, D) in float64, A = -(Q + D) Σ∞⁻¹."""
        mapped = self._mapped()
        return mapped[2], mapped[1]

    def _Q_D(self):
        """(Q, D) in float64, with their graph while one is needed (see _cached)."""
        mapped = self._mapped()
        return mapped[0], mapped[1]

    def _mapped(self):
        """(Q, D, A = -(Q + D) Σ∞⁻¹, ‖A‖₂ or None) in float64, with their graph while one is
        needed (see _cached): from the parameters in one native call where _native_mapped
        applies (‖A‖₂ then comes with them), else by _blocks' torch ops."""
        return self._cached("mapped", self._build_mapped)

    def _build_mapped(self):
        native = self._native_mapped()
        if native is not None:
            return native
        Q, D = (m.to(torch.float64) for m in self._blocks())
        return Q, D, (Q + D) @ self._constants()["-P"], None

    # The generated learned blocks as NativeParamMap entries: per raw parameter (attribute,
    # one (target, row, col, transform) per flat entry); target 0 is W (Q = W - Wᵀ), 1 the
    # factor S (D = S Sᵀ); transform 0 the identity, 1 softplus, 2 its square root.  None
    # where the blocks are not of that form (symbolic parameters) or nothing is learned.
    _param_map = None

    def _native_mapped(self):
        """NativeParamMap's (Q, D, A, ‖A‖₂), or None where the torch ops run (see
        _native_map_inputs)."""
        inputs = self._native_map_inputs()
        return None if inputs is None else native_param_map(*inputs)

    def _native_map_inputs(self):
        """(entries, Q fixed, D fixed, -P, raw parameters) for the native map, or None where the
        torch ops run: no _param_map, the torch path (_native_ok), or a parameter or fixed block
        that is not a float64 tensor (a module cast with .float(), say)."""
        if self._param_map is None or not self._native_ok():
            return None
        entries = self.__dict__.get("_param_entries")
        if entries is None:
            entries = self._param_entries = torch.tensor(
                [(p, k, target, row * self.K + col, f) for p, (_, flat) in enumerate(self._param_map)
                 for k, (target, row, col, f) in enumerate(flat)], dtype=torch.int32).reshape(-1, 5)
        params, buffers = self._parameters, self._buffers
        theta = [params[attr] for attr, _ in self._param_map]
        fixed = [buffers.get("_Q_fixed"), buffers.get("_D_fixed")]
        if any(v is not None and v.dtype != torch.float64 for v in theta + fixed):
            return None
        return (entries, *(None if f is None else f.contiguous() for f in fixed), self._constants()["-P"],
                [v.contiguous() for v in theta])

    def _G_factor(self):
        return self._cached("D_sqrt", lambda: self._D_sqrt().to(torch.float64))

    def _sigma0(self, hybrid):
        K = self.K
        S0 = torch.zeros(K, K, dtype=torch.float64, device=self._device())
        if hybrid and K > 1:
            S0[1:, 1:] = self.aux_init_cov
        return S0

    def _coeffs(self, hybrid):
        return self._cached(("coeffs", hybrid), lambda: self._build_coeffs(hybrid))

    def _build_coeffs(self, hybrid):
        """A, D, Σ0, ‖A‖₂, the series radius, B(T), whether the native pipeline runs, and on the
        torch path the stacked series coefficients (_series_stacks)."""
        native = self._native_ok()
        inputs = self._native_map_inputs() if native else None
        if inputs is not None:
            # the native map's values, without a graph: the fused ELBO node takes the raw
            # parameters itself (c["map"]) and native_kernels reads A, D with their graph
            # from _A_D; ‖A‖₂ comes with them
            _, D, S, A, norm = native_param_values(*inputs)
            mapping = _map_state(inputs, S)
        else:
            _, D, A, norm = self._mapped()
            mapping = None
        if norm is None:  # one-sided Jacobi in C (a few eps, 4 vs 27 µs), else LAPACK's SVD
            norm = native_norm2(A) if native else float(torch.linalg.matrix_norm(A.detach(), ord=2))
        c = self._coeff_dict(A, D, hybrid, native, norm, mapping)
        if not c["native"]:
            c["stacks"] = self._series_stacks(c)
        return c

    def _coeff_dict(self, A, D, hybrid, native, norm, mapping, S0=None, s_T=None):
        """_coeffs' dict (S0 = Σ0 and s_T = B(T): their values, if the caller has them)."""
        return {"A": A, "D": D, "S0": self._constants()[("S0", hybrid)] if S0 is None else S0, "native": native,
                "norm": norm, "radius": _SERIES_TAU / norm if norm > 0 else math.inf,
                "s_T": self._B_T() if s_T is None else s_T, "scale": _series_scale(norm), "map": mapping}

    def _prepare(self, t_min):
        """A training step's coefficients (_coeffs(True)) and importance table (_time_table) in
        one C call (native_prepare), put in this elbo() call's memo; False (nothing done) where
        it does not apply: a table held across steps (table_refresh > 1), t_min outside (0, T)
        (_build_table says so), no native map (_native_map_inputs), or native_prepare's None
        (the separate builds then run, and meet whatever stopped it the same way)."""
        if int(self.table_refresh) > 1 or not 0.0 < t_min < self.T:
            return False
        inputs = self._native_map_inputs()
        if inputs is None:
            return False
        edges, widths, B = self._table_grid(t_min)
        S0, s_T = self._constants()[("S0", True)], self._B_T()
        done = native_prepare(*inputs, S0, _SERIES_TERMS, _SERIES_TAU, s_T, B, widths)
        if done is None:
            return False
        D, S, A, norm, probs, dens = done
        memo = self._call_memo
        memo[("coeffs", True)] = self._coeff_dict(A, D, True, True, norm, _map_state(inputs, S), S0, s_T)
        memo[("call_table", t_min)] = (edges, probs, dens)
        return True

    def _series_stacks(self, c):
        """The series coefficients of Φ, of Σ from Σ0 and of Σn (from 0) as one (n, 3 K²)
        stack (the torch path; the native pipeline forms its own), from A / a and D / a
        (a = c["scale"], _series_scale): the k-th is the unscaled one over a^k."""
        n, S0, a = _SERIES_TERMS, c["S0"], c["scale"]
        powers, moments = _series_coefficients(c["A"] / a, c["D"] / a, torch.stack([S0, torch.zeros_like(S0)]), n)
        return torch.cat([powers.reshape(n, -1), moments[0].reshape(n, -1), moments[1].reshape(n, -1)], 1)

    def _native_ok(self):
        """Whether Φ, Σ and their factors come from the native pipeline (kernel_native): K > 1,
        on the CPU, and the library is available (looked up once per elbo() call)."""
        memo = getattr(self, "_call_memo", None)
        if memo is not None and "_native" in memo:
            return memo["_native"]
        ok = self.K > 1 and self._device().type == "cpu" and native_library() is not None
        if memo is not None:
            memo["_native"] = ok
        return ok

    def _time(self, t):
        """(flat float64 t, shape, dtype, device) of a python float or tensor t."""
        if not torch.is_tensor(t):
            t = torch.as_tensor(t, dtype=torch.get_default_dtype(), device=self._device())
        return t.reshape(-1).to(torch.float64), t.shape, t.dtype, t.device

    def beta(self, t):
        """The time change beta(t) for a float or tensor t, in t's dtype (float64 inside)."""
        t64, shape, dtype, _ = self._time(t)
        return self._beta(t64).reshape(shape).to(dtype)

    def B(self, t):
        """B(t) = ∫₀ᵗ beta(u) du for a float or tensor t, in t's dtype (float64 inside)."""
        t64, shape, dtype, _ = self._time(t)
        return self._B(t64).reshape(shape).to(dtype)

    def _B_at(self, t):
        return self._B(torch.as_tensor(t, dtype=torch.float64, device=self._device()))

    def drift(self, t):
        t64, shape, dtype, _ = self._time(t)
        F = self._beta(t64)[:, None, None] * self._A_D()[0]
        return F.reshape(*shape, self.K, self.K).to(dtype)

    def noise_cov(self, t):
        t64, shape, dtype, _ = self._time(t)
        GG = 2.0 * self._beta(t64)[:, None, None] * self._A_D()[1]
        return GG.reshape(*shape, self.K, self.K).to(dtype)

    def diffusion(self, t):
        """G(t) = sqrt(2 beta(t)) S with S Sᵀ = D, so G Gᵀ = noise_cov(t); shape (*t.shape, K, K).
        S is the learned factor of a learned D, the precomputed root of a fixed D, else the
        symmetric root by eigh (eigenvalues clamped at 0: rounding only, D is PSD)."""
        t64, shape, dtype, _ = self._time(t)
        G = torch.sqrt(2.0 * self._beta(t64))[:, None, None] * self._G_factor()
        return G.reshape(*shape, self.K, self.K).to(dtype)

    def apply_kk(self, mat, y):
        """mat applied to every data coordinate of a state: out[:, i] = Σ_j mat[..., i, j] y[:, j]
        for mat (K, K) or (B, K, K) and y (B, K, *data_shape).  The kernel's own batched apply
        (per-entry passes for small K), for algorithms over the process (samplers, ODEs)."""
        return _apply(mat, y)

    # ------------------------------------------------------- transition kernel
    def _series(self, s, c):
        """Φ(s), Σ(s) by the Taylor series (s ||A||₂ <= tau)."""
        return self._series3(s, c)[:2]

    def _series3(self, s, c, less_identity=False):
        """Φ(s), Σ(s) and the noise part Σn(s) (Σ0 = 0) by the Taylor series: one product of
        the Taylor weights with the stacked coefficients.  less_identity: without the k = 0
        terms, so the first is E = Φ - I, summed without rounding against the identity (what
        the squarings double, see _phi_sigma), and the second Σ - Σ0."""
        K = self.K
        if "stacks" not in c:  # native coefficients asked for the torch path (s with a gradient)
            c["stacks"] = self._series_stacks(c)
        w = _taylor_weights(c["scale"] * s, _SERIES_TERMS)
        out = w[:, 1:] @ c["stacks"][1:] if less_identity else w @ c["stacks"]
        return out.reshape(-1, 3, K, K).unbind(1)

    def _squarings(self, s, c, s_max):
        """j with s_max / 2^j <= the series radius: s_max is given by callers whose times lie
        in [0, T] (c["s_T"] = B(T), no host sync), else read from s."""
        if s_max is None:
            s_max = float(s.detach().abs().max()) if s.numel() else 0.0
        top = s_max / c["radius"]
        return max(0, math.ceil(math.log2(top))) if top > 1.0 else 0

    def _scalar(self, s, hybrid):
        """K = 1 in closed form: Φ = e^{as}, Σ = -Σ∞ expm1(2as) (Σ0 = 0: no auxiliaries; no
        cancellation: a <= 0, so expm1 keeps Σ's relative accuracy at small s)."""
        a, neg_sinf = self._cached("scalar", lambda: (self._A_D()[0][0, 0], -self.stationary_cov[0, 0]))
        a_s = a * s
        return torch.exp(a_s).reshape(-1, 1, 1), (neg_sinf * torch.expm1(2.0 * a_s)).reshape(-1, 1, 1)

    def _phi_sigma(self, s, hybrid, s_max=None):
        """Φ(s), Σ(s) for flat float64 s (see the module doc): the series where s ||A||₂ <=
        tau, elsewhere scaling and squaring: the series at h = s / 2^j, j doublings (j each
        element's own, _own_doublings) of E = Φ - I, E ← 2 E + E E, and Σn ← Σn + Φ Σn Φᵀ,
        then Φ = I + E and Σ = Φ Σ0 Φᵀ + Σn.
        Both run on every element, each in one series product, without a host sync when s_max
        is given (_squarings); torch.where picks per element, so gradients reach only the
        branch an element uses."""
        if self.K == 1:
            return self._scalar(s, hybrid)
        c = self._coeffs(hybrid)
        j = self._squarings(s, c, s_max)
        if c["native"] and not s.requires_grad:
            A, D = self._A_D() if c["map"] is not None else (c["A"], c["D"])  # with their graph
            Phi, Sig, L, Li, hld, ok = native_kernels(A, D, c["S0"], s, j, c["radius"], c["norm"], _SERIES_TERMS)
            L._sdec_inverse, L._sdec_half_log_det = Li, hld  # read by _inverse_T and _log_det
            Sig._sdec_factors = (L, ok)  # read by _cholesky
            return Phi, Sig  # Φ squared, also where a closed form exists (CLD: within 1.1e-15 of it)
        if j == 0:
            return self._series(s, c)
        m = s.shape[0]
        ji = _own_doublings(s.detach(), c["radius"], j)
        Phi, Sig, _ = self._series3(s, c)
        E, Sn = self._series3(torch.ldexp(s, -ji), c, less_identity=True)[::2]
        for level in range(j):  # bmm, not @: one dispatched op per product (matmul adds views)
            more = (ji > level)[:, None, None]  # each element stops at its own doublings
            X = torch.baddbmm(Sn, E, Sn)  # Sn + Φ Sn Φᵀ = Sn + X + X Eᵀ, X = Sn + E Sn
            Sn = torch.where(more, torch.baddbmm(Sn + X, X, E.mT), Sn)
            E = torch.where(more, torch.baddbmm(E, E, E, beta=2.0), E)  # Φ Φ - I = 2 E + E E
        closed = self._phi_closed(s)
        P = closed.to(torch.float64) if closed is not None else E + torch.eye(self.K, dtype=E.dtype, device=E.device)
        big = torch.baddbmm(Sn, torch.matmul(P, c["S0"]), P.mT)
        small = (s.detach().abs() <= c["radius"])[:, None, None]
        return torch.where(small, Phi[:m], P), torch.where(small, Sig[:m], 0.5 * (big + big.mT))

    def transition(self, t, hybrid=True):
        """(Φ_t, Σ_t), each (*t.shape, K, K): y_t | x ~ N(Φ_t m0, Σ_t)."""
        t64, shape, dtype, _ = self._time(t)
        Phi, Sig = self._phi_sigma(self._B(t64), hybrid)
        K = self.K
        return Phi.reshape(*shape, K, K).to(dtype), Sig.reshape(*shape, K, K).to(dtype)

    def _entrywise(self, n):
        """Whether n K x K factorisations (and inverses) go entry by entry across the batch:
        K <= _UNROLL_K and more than _LAPACK_MAX_N of them; otherwise one LAPACK call."""
        return self.K <= _UNROLL_K and n > _LAPACK_MAX_N

    def _cholesky(self, Sig, t64):
        native = getattr(Sig, "_sdec_factors", None)
        if native is not None:  # Σ from the native pipeline, which factored it
            L, ok = native
            bad = ok == 0
        elif self.K == 1:
            L = torch.sqrt(Sig)
            bad = None if bool((Sig > 0).all()) else ~(Sig > 0).reshape(-1)  # one sync when all pass
        elif self._entrywise(Sig.shape[0]):
            L, ok = _cholesky_small(Sig)
            bad = ~ok
        else:
            L, info = torch.linalg.cholesky_ex(Sig)
            bad = info > 0
        if bad is not None and bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            S = Sig[i].detach()
            if not bool(torch.isfinite(S).all()):  # eigvalsh cannot even report on these
                Q, D = self._blocks64()
                raise CholeskyError(
                    f"Sigma_t is not finite at t={float(t64[i]):.6g} (the process's "
                    f"parameters are: Q = {Q.tolist()}, D = {D.tolist()}); a diverged optimisation?")
            lam = float(torch.linalg.eigvalsh(S)[0])
            raise CholeskyError(
                f"Cholesky of Sigma_t failed at t={float(t64[i]):.6g}; smallest "
                f"eigenvalue {lam:.3e}. The kernel is singular as t -> 0: use a larger "
                f"t_min (currently {self.t_min}).")
        return L

    @staticmethod
    def _log_det(L):
        """log det Σ from its (n, K, K) Cholesky factors (the native pipeline's sum, if it made L)."""
        half = getattr(L, "_sdec_half_log_det", None)
        if half is not None:
            return 2.0 * half
        return 2.0 * torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)

    def _kernel_factors(self, t, hybrid):
        """Φ, L = chol Σ and L⁻ᵀ in float64 for flat t (any float dtype)."""
        return tuple(self._factors_with_inverse(self._factor_entry(t, hybrid)))

    def _factor_entry(self, t, hybrid):
        """[Φ, L, L⁻ᵀ or None] for flat t: L⁻ᵀ is filled in on first use (see
        _factors_with_inverse), so a perturbation whose score is never read skips it.  Within
        one elbo() call the entry of one t tensor is built once and shared by the
        perturbation and the score."""
        memo = getattr(self, "_call_memo", None)
        if memo is not None:
            key = ("factors", id(t), hybrid)
            hit = memo.get(key)
            if hit is not None and hit[0] is t and hit[1] == t._version:
                return hit[2]
        t64 = t.to(torch.float64)
        Phi, Sig = self._phi_sigma(self._B(t64), hybrid)
        entry = [Phi, self._cholesky(Sig, t64), None]
        if memo is not None:
            memo[key] = (t, t._version, entry)
        return entry

    def _factors_with_inverse(self, entry):
        if entry[2] is None:
            entry[2] = self._inverse_T(entry[1])
        return entry

    def _inverse_T(self, L):
        """L⁻ᵀ of (n, K, K) Cholesky factors: entrywise or by LAPACK's triangular solve, as
        _cholesky (see _entrywise)."""
        if self.K == 1:
            return 1.0 / L
        native = getattr(L, "_sdec_inverse", None)
        if native is not None:
            return native.mT
        if self._entrywise(L.shape[0]):
            return _tri_inverse_small(L).mT
        eye = torch.eye(self.K, dtype=L.dtype, device=L.device).expand_as(L)
        return torch.linalg.solve_triangular(L, eye, upper=False).mT

    def _elbo_kernels(self, t, t_min, sampled, like, eps):
        """One Φ, Σ and one Cholesky for every time an elbo() call needs, the batch's t and the
        score norm's t_min and T.  Times this call sampled lie in [t_min, T], so the squarings
        come from B(T) without reading them.

        Where the native pipeline runs (and t and the buffers carry no gradient) it is one
        graph node (native_elbo_kernels): the returned dict holds the batch's col, L, -L⁻ᵀ
        and G Gᵀ in like's dtype (put in the call's memo for perturb and score_from_eps),
        the parameter-only terms, and where native_pair_ok holds for (like, eps) the batch's
        perturbation y and its score (else None).  Elsewhere (None is returned) the memo gets the batch's
        (Φ, L, L⁻ᵀ) for the perturbation and the score, the score norm ½ (R(T) - R(t_min))
        from the same factors (see _rate_integral), and (Φ_T, Σ_T) for the prior term."""
        memo, n = self._call_memo, t.shape[0]
        t64 = torch.cat([t.to(torch.float64),
                         torch.tensor([t_min, self.T], dtype=torch.float64, device=t.device)])
        B = self._B(t64)
        c = self._coeffs(True) if self.K > 1 else None
        s_max = c["s_T"] if sampled and c is not None else None
        fused = self._fused_elbo_kernels(t, t64, B, s_max, like, eps, c)
        if fused is not None:
            memo[("cast", id(t), like.dtype)] = (t, t._version, fused)
            return fused
        Phi, Sig = self._phi_sigma(B, True, s_max)
        L = self._cholesky(Sig, t64)
        Li = getattr(L, "_sdec_inverse", None)  # the native pipeline's L⁻¹, else built on use
        memo[("factors", id(t), True)] = (t, t._version, [Phi[:n], L[:n], None if Li is None else Li[:n].mT])
        R = self._rate_antiderivative(L, B)[n:]
        memo[("score_norm", t_min)] = 0.5 * (R[1] - R[0])
        memo[("B_ends", t_min)] = B[n:]
        memo[("at_T",)] = (Phi[n + 1:], Sig[n + 1:])
        return None

    def _fused_elbo_kernels(self, t, t64, B, s_max, like, eps, c=None):
        """native_elbo_kernels for _elbo_kernels, or None where it does not apply (K = 1, the
        torch path, data neither float32 nor float64, data, a time or a buffer with a gradient,
        a failed Cholesky factorisation: the other path then raises the CholeskyError).  c: the
        call's _coeffs(True), if the caller has it."""
        if (self.K == 1 or like.dtype not in (torch.float32, torch.float64) or t.requires_grad
                or like.requires_grad or B.requires_grad or self._sigma_inf.requires_grad
                or self._aux_init_cov.requires_grad):
            return None
        c = self._coeffs(True) if c is None else c
        if not c["native"]:
            return None
        const, n = self._constants(), t.shape[0]
        # gradients to the raw parameters through the node's own map adjoint (c["map"]), else to Q, D
        Q, D = (None, c["D"]) if c["map"] is not None else self._Q_D()
        pair = (like, eps) if native_pair_ok(like, eps) else None
        A = c["A"].detach() if c["A"].requires_grad else c["A"]  # its values (see native_elbo_kernels)
        col, L, U, GG, terms, ok, y, score = native_elbo_kernels(
            Q, D, A, c["S0"], B, self._squarings(B, c, s_max), c["radius"], c["norm"],
            _SERIES_TERMS, const["P"], self._beta(t64[:n]), const["floats"][0], math.prod(like.shape[1:]),
            like.dtype, c["map"], pair)
        if not ok:
            return None
        return {"col": col, "L": L, "U": U, "GG": GG, "terms": terms, "y": y, "score": score}

    def _cast_factors(self, t, dtype):
        """The fused (col, L, -L⁻ᵀ) of t in dtype that this elbo() call made, or None."""
        memo = getattr(self, "_call_memo", None)
        hit = memo.get(("cast", id(t), dtype)) if memo is not None else None
        if hit is None or hit[0] is not t or hit[1] != t._version:
            return None
        return hit[2]["col"], hit[2]["L"], hit[2]["U"]

    def _batch_time(self, t, n, like):
        if not torch.is_tensor(t):
            t = torch.full((n,), float(t), dtype=like.dtype, device=like.device)
        return t.reshape(-1).expand(n) if t.numel() == 1 else t

    def perturb(self, x, t, hybrid=True, eps=None, generator=None, with_score=False):
        """Sample y_t given x (hybrid) or given y0 (hybrid=False); t has shape (B,).

        ``score`` is computed when first read; with_score=True computes it now, in the same
        pass over eps as y where the native apply runs (for callers that will read it)."""
        n, K = x.shape[0], self.K
        t = self._batch_time(t, n, x)
        cast = self._cast_factors(t, x.dtype) if hybrid else None
        if cast is not None:  # this elbo() call's fused factors (see _elbo_kernels)
            col, L, U_cast = cast
            neg_inv_T = lambda: U_cast  # noqa: E731
        else:
            entry = self._factor_entry(t, hybrid)
            Phi, L = (m.to(x.dtype) for m in entry[:2])
            col = Phi[:, :, 0] if hybrid else None
            neg_inv_T = lambda: -self._factors_with_inverse(entry)[2].to(x.dtype)  # noqa: E731 - -L⁻ᵀ
        shape = (n, K) + tuple(x.shape[1:]) if hybrid else tuple(x.shape)
        if eps is None:
            eps = torch.randn(shape, generator=generator, dtype=x.dtype,
                              device=x.device)
        U = neg_inv_T() if with_score else None
        pair = _apply_pair(L, U, col, x, eps) if U is not None and hybrid and K > 1 else None
        if pair is not None:
            y, score = pair
        elif U is not None:
            score = _apply(U, eps, "upper")
        else:
            score = lambda: _apply(neg_inv_T(), eps, "upper")  # noqa: E731
        if hybrid:
            if pair is None:
                y = _apply(L, eps, "lower", col, x)  # Φ[:, :, 0] x + L eps in one set of passes
            mean = lambda: _col(col, x[:, None]) * x[:, None]  # noqa: E731 - lazy
        else:
            mean = _apply(Phi, x)
            y = mean + _apply(L, eps, "lower")
        return Perturbed(y, eps, mean, L, score)

    def score_from_eps(self, eps_fn, hybrid=True):
        """score_fn(y, t) = -L_t⁻ᵀ eps_fn(y, t) for a noise-prediction network."""
        def score_fn(y, t):
            t = self._batch_time(t, y.shape[0], y)
            cast = self._cast_factors(t, y.dtype) if hybrid else None
            U = cast[2] if cast is not None else -self._kernel_factors(t, hybrid)[2].to(y.dtype)
            return _apply(U, eps_fn(y, t), "upper")
        return score_fn

    # ---------------------------------------------------------- prior and aux
    def _gaussian_draw(self, cov, shape, generator, dtype, device):
        eps = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return _apply(torch.linalg.cholesky(cov).to(dtype), eps)

    def _gaussian_log_prob(self, cov, y):
        """log N(y_j; 0, cov) summed over data coordinates j; y (B, k, *data_shape)."""
        n, k, d = y.shape[0], y.shape[1], math.prod(y.shape[2:])
        if k == 0:
            return y.new_zeros(n)
        L = torch.linalg.cholesky(cov)
        eye = torch.eye(k, dtype=L.dtype, device=L.device)
        Linv = torch.linalg.solve_triangular(L, eye, upper=False).to(y.dtype)
        z = _apply(Linv, y).reshape(n, -1)
        const = 0.5 * d * (k * math.log(2 * math.pi) + 2.0 * torch.log(L.diagonal()).sum())
        return -0.5 * (z * z).sum(1) - const.to(y.dtype)

    def prior_sample(self, n, data_shape, generator=None, dtype=None, device=None):
        """n draws (n, K, *data_shape) from N(0, Σ∞ ⊗ I); data_shape is a tuple or an int."""
        dtype = dtype or torch.get_default_dtype()
        device = device or self._device()
        data_shape = (data_shape,) if isinstance(data_shape, int) else tuple(data_shape)
        shape = (n, self.K) + data_shape
        return self._gaussian_draw(self.stationary_cov, shape, generator, dtype, device)

    def prior_log_prob(self, y):
        return self._gaussian_log_prob(self.stationary_cov, y)

    def aux_sample(self, x, generator=None):
        shape = (x.shape[0], self.K - 1) + tuple(x.shape[1:])
        if self.K == 1:
            return x.new_zeros(shape)
        return self._gaussian_draw(self.aux_init_cov, shape, generator, x.dtype, x.device)

    def aux_log_prob(self, v0):
        return self._gaussian_log_prob(self.aux_init_cov, v0)

    # -------------------------------------------------------------- ELBO terms
    def _prior_term(self, x):
        """E log π(y_T) under q(y_T | x) = N(Φ_T (x, 0..), Σ_T), closed form."""
        d, K = x[0].numel(), self.K
        memo = getattr(self, "_call_memo", None)
        at_T = memo.get(("at_T",)) if memo is not None else None
        Phi, Sig = at_T if at_T is not None else self._phi_sigma(self._B_at([self.T]), True)
        const = self._constants()
        P, logdet = const["P"], const["log_det_inf"]
        c = Phi[0, :, 0]
        quad = c @ (P @ c)
        trace = (P * Sig[0]).sum()  # tr(Σ∞⁻¹ Σ_T), both symmetric
        const = -0.5 * d * (K * math.log(2 * math.pi) + logdet + trace)
        sq = (x * x).reshape(x.shape[0], -1).sum(1)
        return const.to(x.dtype) - 0.5 * quad.to(x.dtype) * sq

    def _trace_rate(self, t64):
        """tr(Σ_t⁻¹ G Gᵀ(t)) for the hybrid kernel, flat float64 t."""
        Sig = self._phi_sigma(self._B(t64), True)[1]
        GG = 2.0 * self._beta(t64)[:, None, None] * self._A_D()[1]
        L = self._cholesky(Sig, t64)
        if self.K <= _UNROLL_K:  # tr(Σ⁻¹ GG) = Σ_ij (L⁻ᵀ L⁻¹)_ij GG_ij, both symmetric
            M = _tri_inverse_small(L)
            return ((M.mT @ M) * GG).sum((-2, -1))
        return torch.cholesky_solve(GG, L).diagonal(dim1=-2, dim2=-1).sum(-1)

    def _rate_integral(self, t64, s_max=None, B=None):
        """R(t) = log det Σ_t - 2 tr(A) B(t) at flat float64 t, an antiderivative of the rate
        tr(Σ_t⁻¹ G Gᵀ(t)): Σ_t solves Σ' = F Σ + Σ Fᵀ + G Gᵀ, so by Jacobi's formula
        (log det Σ)' = 2 tr F + tr(Σ⁻¹ G Gᵀ), and F = beta(t) A.  B: B(t64) if known."""
        B = self._B(t64) if B is None else B
        return self._rate_antiderivative(self._cholesky(self._phi_sigma(B, True, s_max)[1], t64), B)

    def _rate_antiderivative(self, L, B):
        """R = log det Σ - 2 tr(A) B from Σ's Cholesky factors L and B = B(t) (see _rate_integral)."""
        return self._log_det(L) - 2.0 * self._A_D()[0].diagonal().sum() * B

    def _score_norm_per_dim(self, t_min):
        """½ ∫_{t_min}^T tr(Σ_t⁻¹ G Gᵀ) dt = ½ (R(T) - R(t_min)): two Cholesky factors."""
        R = self._rate_integral(torch.tensor([t_min, self.T], dtype=torch.float64, device=self._device()))
        return 0.5 * (R[1] - R[0])

    def _elbo_times(self, n, t, sampler, t_min, generator, like):
        if sampler not in _TIME_SAMPLERS:
            raise ValueError(f"unknown time_sampler {sampler!r}; valid: {_TIME_SAMPLERS}")
        if t is None and sampler != "uniform":
            return self.sample_time(n, t_min=t_min, generator=generator, dtype=like.dtype,
                                    device=like.device, stratified=sampler == "stratified")
        if t is None:
            u = torch.rand(n, generator=generator, dtype=torch.float64, device=like.device)
            t = (t_min + (self.T - t_min) * u).to(like.dtype)
        t = self._batch_time(t, n, like)
        if sampler == "uniform":
            return t, torch.full_like(t, self.T - t_min)
        return t, 1.0 / self.time_density(t, t_min=t_min)

    def elbo(self, x, score_fn, t=None, time_sampler="uniform", t_min=None, generator=None):
        """Per-example ELBO terms (hybrid kernel), one time sample per example.

        Every K x K quantity (A, D, the series coefficients, the Cholesky factors of the
        batch's times, the score-norm integral) is built once per call and shared by the
        perturbation, ``score_fn`` (when it comes from ``score_from_eps``) and the terms."""
        outer = getattr(self, "_call_memo", None)
        if outer is None:
            self._call_memo = {}
        try:
            return self._elbo(x, score_fn, t, time_sampler, t_min, generator)
        finally:
            if outer is None:
                self._call_memo = None

    def _elbo(self, x, score_fn, t, time_sampler, t_min, generator):
        t_min = float(self.t_min if t_min is None else t_min)
        n, d = x.shape[0], x[0].numel()
        sampled = t is None
        # training: A, D and the series settings once (with their graph where one is made),
        # before the importance table (no grad) would build them again; with the importance
        # table of this call, both from one C call where _prepare applies
        if self._needs_graph() and not (sampled and time_sampler != "uniform" and self._prepare(t_min)):
            self._coeffs(True)
        t, weight = self._elbo_times(n, t, time_sampler, t_min, generator, x)
        eps = torch.randn((n, self.K) + tuple(x.shape[1:]), generator=generator,
                          dtype=x.dtype, device=x.device)
        fused = self._elbo_kernels(t, t_min, sampled, x, eps)
        if fused is not None and fused["y"] is not None:  # the perturbation came with it
            col = fused["col"]
            pert = Perturbed(fused["y"], eps, lambda: _col(col, x[:, None]) * x[:, None], fused["L"],
                             fused["score"])
        else:
            pert = self.perturb(x, t, hybrid=True, eps=eps, with_score=True)
        model = score_fn(pert.y, t)
        if fused is not None:
            if model.shape != pert.score.shape:  # a broadcasting model: its difference first
                model, target = (model - pert.score).reshape(n, self.K, -1), None
            else:
                target = pert.score
            aux = d * self._constants()["floats"][1]  # the same double as d times the float64 tensor
            prior, score, norm, div, trunc, total, aux = _Terms.apply(fused["terms"], model, target, fused["GG"],
                                                                      x, weight, aux)
            return ELBOTerms(prior=prior, score=score, score_norm=norm, divergence=div, truncation=trunc,
                             aux_entropy=aux, t=t, weight=weight, total=total)
        ones = x.new_ones(n)
        aux = (d * self._constants()["aux_entropy"]).to(x.dtype) * ones  # float64, no graph
        diff = (model - pert.score).reshape(n, self.K, -1)
        # diffᵀ G Gᵀ(t) diff = Σ_ij (G Gᵀ)_ij <diff_i, diff_j> (_gram_form)
        q = _gram_form(diff, self.noise_cov(t))
        norm = self._cached(("score_norm", t_min), lambda: self._score_norm_per_dim(t_min))
        trA = self._A_D()[0].diagonal().sum()
        B = self._call_memo[("B_ends", t_min)]  # B(t_min), B(T), from _elbo_kernels
        return ELBOTerms(
            prior=self._prior_term(x), score=-0.5 * weight * q,
            score_norm=(d * norm).to(x.dtype) * ones,
            divergence=(d * trA * (B[1] - B[0])).to(x.dtype) * ones,
            truncation=(d * trA * B[0]).to(x.dtype) * ones,
            aux_entropy=aux, t=t, weight=weight)

    # ------------------------------------------------ importance time sampler
    def _time_table(self, t_min):
        """The importance table (edges, probs, density) for t_min.

        Without a gradient into the parameters it is the current parameters' table (cached
        by value like everything else).  While one is needed (training), a table built at
        most table_refresh - 1 parameter versions ago is reused: every value-changing write
        counts as one version (an optimizer step, load_state_dict, a .data write), and a
        changed T or device always rebuilds.  A stale table is still an exact proposal:
        sample_time draws t and its weight 1 / p(t) from the same table, so the ELBO estimate
        stays unbiased and only its variance can move (by the drift of p over those steps)."""
        key = ("table", t_min)
        build = lambda: self._build_table(t_min)  # noqa: E731
        refresh = int(self.table_refresh)
        memo = getattr(self, "_call_memo", None)
        if refresh <= 1 and memo is not None and self._needs_graph():
            # training, rebuilt at every parameter change: this elbo() call's own table (the
            # parameters cannot change inside the call), without the cross-call cache's copy
            # and comparison of the module state
            if ("call_table", t_min) not in memo:
                c = self._coeffs(True) if self.K > 1 else None  # this call's coefficients as built:
                with torch.no_grad():  # the table reads their values only (no detached copy)
                    memo[("call_table", t_min)] = self._build_table(t_min, c)
            return memo[("call_table", t_min)]
        if refresh <= 1 or not self._needs_graph():
            return self._cached(key, build, graph=False)
        self._sync_state()
        held_tables = self.__dict__.setdefault("_held_tables", {})
        held = held_tables.get(t_min)
        if key not in self._cache and held is not None:
            table, T, device, built = held
            if T == self.T and device == self._device() and self._versions - built < refresh:
                return table
        table = self._cached(key, build, graph=False)
        held_tables[t_min] = (table, self.T, self._device(), self._versions)
        return table

    def _build_table(self, t_min, c=None):
        """Bin edges, bin probabilities and piecewise-constant density of p ∝ tr(Σ⁻¹GGᵀ).

        _TABLE_BINS = 128 geometric bins: on every shipped process the importance weight's own
        relative variance Var_p[rate / p] is below 2e-4 (4e-6 at 512 bins), far below the
        score term's, whose uniform/importance variance ratios match 512 bins' to 3 digits.

        A bin's mass is the exact integral of the rate over it, R between its edges (one Σ per
        edge; see _rate_integral).  A bin whose difference rounding leaves not > 0 takes its
        midpoint rule instead, so the density stays positive wherever the rate is."""
        if not 0.0 < t_min < self.T:
            raise ValueError(f"importance sampling needs 0 < t_min < T, got t_min={t_min}")
        edges, widths, B = self._table_grid(t_min)
        if c is None and self.K > 1:  # else the caller's _coeffs(True), read without a graph
            c = self._coeffs(True)
        if c is not None and c["native"]:  # the same sums in one C call, unless a bin needs the below
            done = native_rate_table(c["A"], c["D"], c["S0"], B, self._squarings(B, c, c["s_T"]),
                                     c["radius"], c["norm"], _SERIES_TERMS, widths)
            if done is not None:
                return edges, done[0], done[1]
        R = self._rate_integral(edges, c["s_T"] if c is not None else None, B)
        mass = R[1:] - R[:-1]
        if not bool((mass > 0).all()):
            bad = ~(mass > 0)
            mid = torch.sqrt(edges[1:] * edges[:-1])[bad]
            mass[bad] = self._trace_rate(mid) * widths[bad]
        probs = mass / mass.sum()
        return edges, probs, probs / widths

    def _table_grid(self, t_min):
        """The table's bin edges (geometric from t_min to T, both exact), widths and B at the
        edges, float64, made once per (t_min, T, device): they depend on nothing else (the
        time change beta(t) depends on t and constants only: the language allows no more)."""
        key = (t_min, float(self.T), self._device())
        grids = self.__dict__.setdefault("_grids", {})
        if key not in grids:
            edges = torch.exp(torch.linspace(math.log(t_min), math.log(self.T), _TABLE_BINS + 1,
                                             dtype=torch.float64, device=key[2]))
            edges[0], edges[-1] = t_min, self.T
            grids[key] = (edges, edges[1:] - edges[:-1], self._B(edges))
        return grids[key]

    def _B_T(self):
        """B(T) as a float, once per (T, device) (see _table_grid)."""
        key = ("B_T", float(self.T), self._device())
        grids = self.__dict__.setdefault("_grids", {})
        if key not in grids:
            grids[key] = float(self._B_at([self.T]).detach().max())
        return grids[key]

    def time_density(self, t, t_min=None):
        """Importance density p(t) on [t_min, T] (0 outside), same dtype as t."""
        t_min = float(self.t_min if t_min is None else t_min)
        edges, _, dens = self._time_table(t_min)
        t64 = torch.as_tensor(t, dtype=torch.float64, device=edges.device)
        i = (torch.searchsorted(edges, t64, right=True) - 1).clamp(0, _TABLE_BINS - 1)
        inside = (t64 >= t_min) & (t64 <= self.T)
        out = torch.where(inside, dens[i], torch.zeros_like(t64))
        return out.to(t.dtype if torch.is_tensor(t) else torch.get_default_dtype())

    def sample_time(self, n, t_min=None, generator=None, dtype=None, device=None,
                    stratified=False):
        """(t, weight): t ~ p (pick a bin, then uniform in it), weight = 1 / p(t).

        With ``stratified=True`` the n times are one draw from each of n equal-probability
        strata of p (u_i = (i + U_i) / n pushed through the inverse CDF of p, in random order):
        each t_i is still marginally ~ p, so the weighted ELBO stays unbiased, but the batch
        covers [t_min, T] evenly and the batch mean has lower variance.
        """
        t_min = float(self.t_min if t_min is None else t_min)
        edges, probs, dens = self._time_table(t_min)
        gdev = generator.device if generator is not None else edges.device
        cdf = torch.cumsum(probs, 0)
        if stratified:
            u = torch.rand(n, generator=generator, dtype=torch.float64, device=gdev)
            order = torch.randperm(n, generator=generator, device=gdev)
            u = ((order.to(torch.float64) + u) / n).to(edges.device) * cdf[-1]
            i = torch.searchsorted(cdf, u, right=True).clamp(0, _TABLE_BINS - 1)
            below = torch.where(i > 0, cdf[(i - 1).clamp(min=0)], torch.zeros_like(u))
            frac = ((u - below) / probs[i]).clamp(0.0, 1.0)
        else:
            u = torch.rand(2, n, generator=generator, dtype=torch.float64, device=gdev)
            u = u.to(edges.device)
            i = torch.searchsorted(cdf, u[0] * cdf[-1], right=True).clamp(0, _TABLE_BINS - 1)
            frac = u[1]
        t = edges[i] + frac * (edges[i + 1] - edges[i])
        dtype = dtype or torch.get_default_dtype()
        device = device or edges.device
        return t.to(dtype=dtype, device=device), (1.0 / dens[i]).to(dtype=dtype, device=device)
