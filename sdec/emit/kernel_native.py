"""The native K x K pipeline and state apply: a small C library (kernel_native.c) called
through ctypes.

NativeKernels: Φ, Σ, L = chol Σ, L⁻¹ and log det Σ for a batch of s = B(t), and their exact
reverse-mode adjoint into A and D, in one call each.  The torch path issues a few hundred
small ATen ops (series coefficients, Taylor products, squarings, Cholesky, triangular
solves) and as many backward nodes per learned ELBO step, each a few µs of dispatch on a
3 x 3 matrix.  The C code runs the same method (the series about s = 0 where |s| <= radius,
else the series at s 2^-j and j doublings; see kernel_base) in float64 loops, with the terms
each element needs (series_weights in the C source), and agrees with the torch path to rounding
(tests/test_native.py), except where the float64 squaring chain may have grown its rounding
past 2^11 u (many doublings, or a non-normal Φ): that element runs again in double-double
(needs_dd in the C source), and the torch path stays in float64.

native_apply: y[:, i] = Σ_j M[:, i, j] y[:, j] + col[:, i] x for float32 CPU states in one pass
over the data; native_gram: the per-example products Σ_n g_i y_j of its matrix gradient.
native_apply2 / native_gram2: the perturbation's two applies (y and the score) and their two
matrix gradients, each pair in one pass over ε.  native_norm2: ‖A‖₂ (one-sided Jacobi).

For elbo() (kernel_base._elbo): NativeElboKernels, the process side of the ELBO as one
autograd node (Φ's first column, L, -L⁻ᵀ and G Gᵀ at the batch's times and the five
parameter-only terms from one pipeline call; one adjoint call into Q and D); native_terms /
native_terms_backward, the score's quadratic form and the per-example terms (float32);
native_rate_table, the importance table; native_gram_form_backward, the quadratic form's
gradient on the unfused path.  NativeParamMap: a learned process's map from its raw
parameters to Q, D and A = -(Q + D) Σ∞⁻¹ (and ‖A‖₂), one C call each way.

The library is compiled once per machine with the C compiler ($CC, default cc) into the
compiled-module cache ($SDEC_CACHE, else <tmp>/sdec-cache-<uid>), named by the hash of its
source, compiler and platform.  Without a compiler (or with SDEC_NATIVE=0) the torch path
runs, with one warning when building failed.  CPU only.
"""
import ctypes
import hashlib
import math
import os
import shlex
import subprocess
import sys
import tempfile
import warnings

import torch

_NATIVE_STATE = {}   # "lib": the loaded library, or None once building it failed


def _native_c_source():
    """The C source: a generated module carries it as _NATIVE_C; the package reads the file."""
    src = globals().get("_NATIVE_C")
    if src is None:
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "kernel_native.c"), encoding="utf-8") as handle:
            src = handle.read()
    return src


def _native_build():
    src = _native_c_source()
    cc = shlex.split(os.environ.get("CC") or "cc")
    digest = hashlib.sha256("\0".join([src, *cc, sys.platform]).encode()).hexdigest()[:20]
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    folder = os.environ.get("SDEC_CACHE") or os.path.join(tempfile.gettempdir(), f"sdec-cache-{uid}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"sdec_native_{digest}.so")
    if not os.path.exists(path):
        stem = f"{path}.{os.getpid()}"
        with open(stem + ".c", "w", encoding="utf-8") as handle:
            handle.write(src)
        try:  # no -ffast-math, no FMA contraction: IEEE float64 as written
            subprocess.run([*cc, "-O3", "-fPIC", "-shared", "-ffp-contract=off", "-o", stem + ".so",
                            stem + ".c", "-lm"], check=True, capture_output=True, timeout=300)
            os.replace(stem + ".so", path)
        finally:
            for leftover in (stem + ".c", stem + ".so"):
                if os.path.exists(leftover):
                    os.remove(leftover)
    lib = ctypes.CDLL(path)
    i, d, p = ctypes.c_int, ctypes.c_double, ctypes.c_void_p
    lib.sdec_kernels_forward.argtypes = [i, i, i, d, d, i] + [p] * 11
    lib.sdec_kernels_backward.argtypes = [i, i, i, d, d, i] + [p] * 14
    lib.sdec_kernels_forward.restype = lib.sdec_kernels_backward.restype = i
    lib.sdec_apply_f32.argtypes = [i, i, ctypes.c_long, p, i, p, p, p, i, p]
    lib.sdec_apply_f32.restype = None
    lib.sdec_gram_f32.argtypes = [i, i, i, ctypes.c_long, p, p, i, p]
    lib.sdec_gram_f32.restype = None
    lib.sdec_apply2_f32.argtypes = [i, i, ctypes.c_long] + [p] * 7
    lib.sdec_apply2_f32.restype = None
    lib.sdec_gram2_f32.argtypes = [i, i, ctypes.c_long] + [p] * 5
    lib.sdec_gram2_f32.restype = None
    lib.sdec_elbo_forward_node.argtypes = ([i, i, i, d, d, i] + [p] * 6 + [d, d, i] + [p] * 12
                                           + [ctypes.c_long] + [p] * 4)
    lib.sdec_elbo_forward_node.restype = i
    lib.sdec_elbo_backward_node.argtypes = ([i, i, i, d, d, i] + [p] * 9 + [d, i] + [p] * 9
                                            + [ctypes.c_long] + [p] * 4 + [i] + [p] * 5)
    lib.sdec_elbo_backward_node.restype = i
    lib.sdec_terms_forward.argtypes = [i, i, ctypes.c_long] + [p] * 6 + [d] + [p] * 10
    lib.sdec_terms_forward.restype = None
    lib.sdec_terms_backward.argtypes = [i, i, ctypes.c_long] + [p] * 11 + [i] + [p] * 3
    lib.sdec_terms_backward.restype = None
    lib.sdec_rate_table.argtypes = [i, i, i, d, d, i] + [p] * 7
    lib.sdec_rate_table.restype = i
    lib.sdec_gram_form_backward.argtypes = [i, i, ctypes.c_long] + [p] * 6
    lib.sdec_gram_form_backward.restype = None
    lib.sdec_norm2.argtypes = [i, p]
    lib.sdec_norm2.restype = d
    lib.sdec_param_map.argtypes = [i, i] + [p] * 9
    lib.sdec_param_map.restype = d
    lib.sdec_param_map_backward.argtypes = [i, i] + [p] * 8
    lib.sdec_param_map_backward.restype = i
    lib.sdec_elbo_prepare.argtypes = [i, i] + [p] * 6 + [i, d, d, i] + [p] * 9
    lib.sdec_elbo_prepare.restype = i
    return lib


def native_library():
    """The loaded library, or None: SDEC_NATIVE=0, or no working C compiler (warned once)."""
    if os.environ.get("SDEC_NATIVE", "1") == "0":
        return None
    if "lib" not in _NATIVE_STATE:
        try:
            _NATIVE_STATE["lib"] = _native_build()
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            warnings.warn(f"sdec: the native K x K pipeline could not be built ({err}"
                          f"{': ' + detail.decode(errors='replace')[-300:] if detail else ''}); "
                          f"using the torch path", RuntimeWarning, stacklevel=2)
            _NATIVE_STATE["lib"] = None
    return _NATIVE_STATE["lib"]


def _loaded():
    """The library for a caller that already chose the native path (a *_ok check or the
    coefficients' "native" flag, both through native_library()): without reading the
    environment again on every call of a training step."""
    return _NATIVE_STATE.get("lib") or native_library()


def _ptr(t):
    """t's data pointer, as the int that ctypes passes for a c_void_p argument."""
    return t.data_ptr()


def _maybe_ptr(t):
    """_ptr(t), or None (a NULL pointer) for None."""
    return None if t is None else t.data_ptr()


def _pointers(*tensors):
    """The data pointers of plain CPU tensors; a clear error for the storage-less tensors of
    torch.func transforms, which the C code cannot read."""
    try:
        return [v.data_ptr() for v in tensors]
    except RuntimeError as err:
        raise RuntimeError(_FUNC_HINT.format(err=err)) from None


_FUNC_HINT = ("sdec: the native K x K pipeline needs plain CPU tensors ({err}); under torch.func "
              "transforms (grad, vmap, jacrev) set SDEC_NATIVE=0 for the torch path")


class NativeKernels(torch.autograd.Function):
    """(A, D, S0, s, j, radius, anorm, terms) -> Φ, Σ, L, L⁻¹, Σ_k log L_kk (each per s) and ok
    (int32, 0 where Σ's Cholesky pivot is not > 0; L, L⁻¹ are then zero from that row).
    A, D, S0 (K, K) and s (m,) are float64 on the CPU; D and S0 symmetric.  Gradients reach A
    and D (the adjoint for symmetric changes of D); s and S0 are constants.  Call it through
    native_kernels.

    forward takes ctx (no setup_context): torch 2.14 binds a setup_context Function's
    arguments with inspect.signature on every call, about 60 us, more than the C work for a
    batch; the price is that torch.func transforms cannot run it (native_kernels says so)."""

    @staticmethod
    def forward(ctx, A, D, S0, s, j, radius, anorm, terms):
        A, D, S0, s = (v.contiguous() for v in (A, D, S0, s))
        keep = _chain_buffer(A, s.shape[0], j, any(ctx.needs_input_grad[:2]))
        Phi, Sig, L, Li, hld, ok = _kernels_forward(A, D, S0, s, j, radius, anorm, terms, keep)
        ctx.save_for_backward(A, D, S0, s, L, Li, keep)
        ctx.series = j, radius, anorm, terms
        ctx.mark_non_differentiable(ok)
        return Phi, Sig, L, Li, hld, ok

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gPhi, gSig, gL, gLi, ghld, _gok):
        gA, gD = _kernels_backward(ctx.saved_tensors, ctx.series, (gPhi, gSig, gL, gLi, ghld))
        return gA, gD, None, None, None, None, None, None


def _chain_buffer(A, m, j, needed):
    """Room for the squaring chains (E(h 2^l) = Φ(h 2^l) - I and the noise part; l = 0..j) of
    m elements, or None unless a backward will run (needed): the forward writes them, the
    backward reads them instead of recomputing them."""
    return A.new_empty(m, 2 * (j + 1), A.shape[-1], A.shape[-1]) if needed else None


def _kernels_forward(A, D, S0, s, j, radius, anorm, terms, keep=None):
    """The C forward: Φ, Σ, L, L⁻¹, Σ_k log L_kk per s and ok, for contiguous float64 inputs;
    the squaring chains go to keep (_chain_buffer) unless it is None."""
    K, m = A.shape[-1], s.shape[0]
    Phi, Sig, L, Li = (A.new_empty(m, K, K) for _ in range(4))
    hld = A.new_empty(m)
    ok = torch.empty(m, dtype=torch.int32)
    rc = _loaded().sdec_kernels_forward(K, terms, j, radius, anorm, m,
                                        *_pointers(A, D, S0, s, Phi, Sig, L, Li, hld, ok), _maybe_ptr(keep))
    if rc != 0:
        raise MemoryError("sdec native pipeline: out of memory")
    return Phi, Sig, L, Li, hld, ok


def _kernels_backward(saved, series, grads):
    """The C adjoint: (gA, gD) from the saved (A, D, S0, s, L, L⁻¹, chains), the series
    settings (j, radius, ‖A‖₂, terms) and the gradients of (Φ, Σ, L, L⁻¹, Σ log L_kk)."""
    A, D, S0, s, L, Li = (v.contiguous() for v in saved[:6])
    keep = saved[6]  # None: the chains are recomputed
    grads = [g.to(torch.float64).contiguous() for g in grads]
    gA, gD = torch.zeros_like(A), torch.zeros_like(D)
    rc = _loaded().sdec_kernels_backward(A.shape[-1], series[3], series[0], series[1], series[2],
                                         s.shape[0], *_pointers(A, D, S0, s, L, Li, *grads, gA, gD),
                                         _maybe_ptr(keep))
    if rc != 0:
        raise MemoryError("sdec native pipeline: out of memory")
    return gA, gD


def _applied(function, *args):
    """function.apply(*args), with an error that says what to do under torch.func transforms."""
    try:
        return function.apply(*args)
    except RuntimeError as err:
        if "functorch transforms" not in str(err):
            raise
        raise RuntimeError(_FUNC_HINT.format(err=err)) from None


def native_kernels(A, D, S0, s, j, radius, anorm, terms):
    """NativeKernels.apply (see _applied)."""
    return _applied(NativeKernels, A, D, S0, s, j, radius, anorm, terms)


class NativeElboKernels(torch.autograd.Function):
    """What one elbo() call needs from the process, as one graph node: native_elbo_kernels.
    Its gradients go to Q and D (A = -(Q + D) P is an input for its values only), or through
    the map's adjoint to the raw parameters.  Forward and backward are one C call each
    (sdec_elbo_forward_node / sdec_elbo_backward_node): the backward folds every output's
    gradient into the pipeline's (Φ, Σ, L, L⁻¹, Σ log L_kk) gradients and runs its adjoint, so
    autograd walks one node instead of about fifty K x K ones, and no small ATen op runs on
    either side.  With pair = (x, eps) the perturbation (y, score) = (L eps + col x, -L⁻ᵀ eps) is
    made in the same call (native_apply2's pass), and its gradients (native_pair_grads' products)
    join L's, U's and col's in the backward's call; so does the native map's adjoint."""

    @staticmethod
    def forward(ctx, Q, D, A, S0, s, j, radius, anorm, terms, P, beta, log_det_inf, d, dtype, mapping, pair,
                *theta):
        # inputs are read through their pointers only (no detach: the node's own outputs carry
        # the graph)
        A, D, S0, s, P, beta = (v.contiguous() for v in (A, D, S0, s, P, beta))
        K, m = A.shape[-1], s.shape[0]
        n = m - 2
        need = ctx.needs_input_grad
        keep = need[0] or need[1] or any(need[16:])  # Q, D or theta: the squaring chains are kept
        # the pipeline's own outputs in one float64 workspace (_elbo_workspace's layout)
        work, (Phi, Sig, L, Li, hld, ok, chains) = _elbo_workspace(A, m, j, keep)
        col = torch.empty(n, K, dtype=dtype)
        Lb, U, GG = (torch.empty(n, K, K, dtype=dtype) for _ in range(3))
        out_terms = torch.empty(5, dtype=dtype)
        y = score = None
        apply = (0, None, None, None, None)  # (N, x, eps, y, score): the perturbation's pass, if made
        if pair is not None:
            x, eps = (v.contiguous() for v in pair)
            y, score = torch.empty_like(eps), torch.empty_like(eps)
            apply = (math.prod(eps.shape[2:]) if n else 0, *_pointers(x, eps, y, score))
        rc = _loaded().sdec_elbo_forward_node(
            K, terms, j, radius, anorm, n, *_pointers(A, D, S0, s, beta, P), float(log_det_inf), float(d),
            int(dtype == torch.float32), Phi, Sig, L, Li, hld, ok, *_pointers(col, Lb, U, GG, out_terms), chains,
            *apply)
        if rc < 0:
            raise MemoryError("sdec native pipeline: out of memory")
        if rc != 0:
            y = score = None
        ctx.set_materialize_grads(False)
        x, eps = (None, None) if pair is None else pair  # saved: an in-place change of either is caught
        ctx.save_for_backward(A, D, S0, s, beta, P, work, x, eps, *theta)
        ctx.keep = keep
        ctx.series, ctx.d, ctx.f32 = (j, radius, anorm, terms), float(d), int(dtype == torch.float32)
        ctx.mapping = None if mapping is None else mapping[:3]  # (entries, -P, S); theta saved above
        return col, Lb, U, GG, out_terms, rc == 0, y, score

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gcol, gL, gU, gGG, gterms, _ok, gy, gs):
        # one C call (sdec_elbo_backward_node): the perturbation's share of the gradients of
        # col, L and U (native_pair_grads' products), the pipeline's adjoint and the map's
        A, D, S0, s, beta, P, work, x, eps, *theta = ctx.saved_tensors
        j, radius, anorm, terms = ctx.series
        K = A.shape[-1]
        Phi, _, L, Li, _, _, chains = _elbo_layout(work.data_ptr(), K, s.shape[0], j, ctx.keep)
        pair = x is not None and (gy is not None or gs is not None)
        if pair:
            x, eps = x.contiguous(), eps.contiguous()
        held = [None if g is None else g.contiguous() for g in (gcol, gL, gU, gGG, gterms, gy, gs)]
        if ctx.mapping is None:
            gA, gQ, gD = torch.zeros_like(A), torch.empty_like(A), torch.zeros_like(D)
            grads = _pointers(gA, gQ, gD)
            mapped = (0, None, None, None, None, None)
            out = None
        else:  # gA, gQ, gD: the C call's own scratch
            grads = (None, None, None)
            entries, negP, S = ctx.mapping
            out = [torch.empty_like(v) for v in theta]
            pointers = ctypes.c_void_p * len(theta)
            mapped = (entries.shape[0], _ptr(entries), pointers(*_pointers(*theta)), _ptr(S), _ptr(negP),
                      pointers(*_pointers(*out)))
        rc = _loaded().sdec_elbo_backward_node(
            K, terms, j, radius, anorm, s.shape[0] - 2, *_pointers(A, D, S0, s, beta, P), Phi, L, Li,
            ctx.d, ctx.f32, *[_maybe_ptr(g) for g in held[:5]], *grads, chains,
            math.prod(eps.shape[2:]) if pair and eps.shape[0] else 0, *(_pointers(x, eps) if pair else (None, None)),
            *[_maybe_ptr(g) if pair else None for g in held[5:]], *mapped)
        if rc != 0:
            raise MemoryError("sdec native pipeline: out of memory")
        if out is None:
            return gQ, gD, *([None] * 14)
        return None, None, *([None] * 14), *out


def _elbo_layout(base, K, m, j, keep):
    """Pointers into NativeElboKernels' float64 workspace at address base: Φ, Σ, L, L⁻¹ (m K²
    each), Σ log L_kk (m), ok (m int32, in m doubles' room) and, when keep, the squaring
    chains (m 2 (j + 1) K², see _chain_buffer), else None."""
    mkk = m * K * K
    at = [base + 8 * k * mkk for k in range(4)]
    hld, ok = base + 32 * mkk, base + 32 * mkk + 8 * m
    return (*at, hld, ok, base + 32 * mkk + 16 * m if keep else None)


def _elbo_workspace(A, m, j, keep):
    """(workspace, pointers) for NativeElboKernels: one allocation for its scratch and saved
    outputs instead of seven (_elbo_layout)."""
    K = A.shape[-1]
    work = A.new_empty(4 * m * K * K + 2 * m + (m * 2 * (j + 1) * K * K if keep else 0))
    return work, _elbo_layout(work.data_ptr(), K, m, j, keep)


def native_pair_grads(x, eps, gy, gs, want=(True, True, True)):
    """The matrix gradients of the perturbation (y, s) = (L eps + col x, U eps) (native_apply2)
    from those of y and s (each None or like eps): (d L, d U, d col) = (tril(gy epsᵀ),
    triu(gs epsᵀ), gy xᵀ) per example, each None where its gradient is absent or not wanted
    (want: L, U, col); d L and d U in one pass over eps (native_gram2) where both are made."""
    dcol = None
    if gy is not None and gs is not None and want[0] and want[1]:
        dL, dU = native_gram2(gy, gs, eps)
    else:
        dL = _gram(gy, eps, "lower") if gy is not None and want[0] else None
        dU = _gram(gs, eps, "upper") if gs is not None and want[1] else None
    if gy is not None and want[2]:
        n, K = gy.shape[0], gy.shape[1]
        dcol = (x.reshape(n, 1, -1) @ gy.reshape(n, K, -1).mT).squeeze(1)
    return dL, dU, dcol


def native_elbo_kernels(Q, D, A, S0, s, j, radius, anorm, terms, P, beta, log_det_inf, d, dtype, mapping=None,
                        pair=None):
    """One elbo() call's process quantities from one native pipeline call, for s = B(t) of
    the batch's n times followed by B(t_min) and B(T), and A = -(Q + D) P (its values: the
    gradients go to Q and D, so autograd never walks A's own graph); A, D, S0, s, P and beta
    float64 CPU tensors:

    col (n, K) = Φ[:, :, 0], L (n, K, K) = chol Σ, U (n, K, K) = -L⁻ᵀ, GG (n, K, K) =
    2 beta D (beta (n,) at the batch's times), each in ``dtype``; terms (5,) in ``dtype``:
    the prior's constant -½ d (K log 2π + log det Σ∞ + tr(P Σ_T)) and its quad cᵀ P c
    (c = Φ_T[:, 0], P = Σ∞⁻¹), then d times the score norm ½ (R(T) - R(t_min)), the
    divergence tr A (s_T - s_min) and the truncation tr A s_min (d: data dimensions); and
    ok, a bool: False where some Σ's Cholesky pivot is not > 0 (the outputs are then not
    written).  Gradients reach Q and D only; or, with mapping = (entries, -P, S, theta) of the
    native map that made D and A (native_param_values; Q is then None), the raw parameters
    theta themselves, the map's adjoint run in the node's own backward (no node of its own).
    Then (y, score): with pair = (x, eps) (native_pair_ok; no graph into either) the batch's
    perturbation y = col x + L eps and its score U eps, else (or where ok is False) None."""
    theta = () if mapping is None else mapping[3]
    return _applied(NativeElboKernels, Q, D, A, S0, s, j, radius, anorm, terms, P, beta, log_det_inf, d,
                    dtype, mapping, pair, *theta)


def native_pair_ok(x, eps):
    """Whether the native pass can make the perturbation of x (B, *data) with eps (B, K, *data)
    (native_apply2; native_elbo_kernels' pair): float32 CPU tensors without a graph, K >= 2."""
    return (x.dtype == eps.dtype == torch.float32 and x.device.type == eps.device.type == "cpu"
            and not (x.requires_grad or eps.requires_grad) and eps.dim() >= 2 and eps.shape[1] >= 2
            and x.shape == (eps.shape[0],) + tuple(eps.shape[2:]))


_TRI = {None: 0, "lower": -1, "upper": 1}


def native_apply(mat, y, tri, col, x):
    """out[:, i] = Σ_j mat[..., i, j] y[:, j] + col[:, i] x in one pass over the data, for float32
    CPU states (no graph) with K >= 2, or None where the torch ops must run (another dtype or
    device, no library, or K = 1, whose two torch passes measured as fast: vpsde perturb 2.55
    vs 2.61 ms)."""
    given = [v for v in (mat, y, col, x) if v is not None]
    if (any(v.dtype != torch.float32 or v.device.type != "cpu" for v in given)
            or y.dim() < 2 or y.shape[1] < 2):
        return None
    B, K = y.shape[0], y.shape[1]
    if mat.shape[-2:] != (K, K) or mat.dim() not in (2, 3) or (mat.dim() == 3 and mat.shape[0] != B):
        return None
    if col is not None and (col.shape != (B, K) or x.shape != (B,) + tuple(y.shape[2:])):
        return None
    lib = native_library()
    if lib is None:
        return None
    N = y[0, 0].numel() if B else 0
    mat, y = mat.contiguous(), y.contiguous()
    out = torch.empty_like(y)
    if col is not None:
        col, x = col.contiguous(), x.contiguous()
    lib.sdec_apply_f32(B, K, N, _ptr(mat), K * K if mat.dim() == 3 else 0, _ptr(y),
                       _maybe_ptr(col), _maybe_ptr(x),
                       _TRI[tri], _ptr(out))
    return out


def native_gram(a, c, tri=None):
    """(B, Ka, Kc) products Σ_n a[:, i, n] c[:, j, n] of float32 CPU tensors a (B, Ka, *data) and
    c (B, Kc, *data) in float32 (tri "lower" / "upper": that triangle only, the rest zero), or
    None where torch must do it."""
    if (a.dtype != torch.float32 or c.dtype != torch.float32 or a.device.type != "cpu"
            or c.device.type != "cpu" or a.dim() < 2 or c.dim() < 2 or a.shape[0] != c.shape[0]
            or a.shape[2:] != c.shape[2:]):
        return None
    if native_library() is None:
        return None
    return _gram(a, c, tri)


def _gram(a, c, tri=None):
    """native_gram's product, for a caller that checked what native_gram checks."""
    B, Ka, Kc = a.shape[0], a.shape[1], c.shape[1]
    a, c = a.contiguous(), c.contiguous()
    out = torch.empty(B, Ka, Kc, dtype=torch.float32)
    N = a[0, 0].numel() if B and Ka else 0
    _loaded().sdec_gram_f32(B, Ka, Kc, N, _ptr(a), _ptr(c), _TRI[tri], _ptr(out))
    return out


def native_apply2_ok(L, U, col, x, eps):
    """Whether native_apply2 runs on these: x and eps as native_pair_ok takes them, float32 CPU
    L, U (B, K, K) and col (B, K), and the library is available."""
    if not native_pair_ok(x, eps) or any(v.dtype != torch.float32 or v.device.type != "cpu" for v in (L, U, col)):
        return False
    B, K = eps.shape[0], eps.shape[1]
    return (L.shape == (B, K, K) and U.shape == (B, K, K) and col.shape == (B, K)
            and native_library() is not None)


def native_apply2(L, U, col, x, eps):
    """(y, s) = (L eps + col x, U eps) per example in one pass over eps (L lower, U upper; see
    native_apply2_ok for what it takes), bit-identical to two native_apply calls."""
    L, U, col, x, eps = (v.contiguous() for v in (L, U, col, x, eps))
    y, s = torch.empty_like(eps), torch.empty_like(eps)
    B, N = eps.shape[0], eps[0, 0].numel() if eps.shape[0] else 0
    _loaded().sdec_apply2_f32(B, eps.shape[1], N, *_pointers(L, U, col, x, eps, y, s))
    return y, s


def native_gram2(gy, gs, eps):
    """(tril(gy epsᵀ), triu(gs epsᵀ)) per example for float32 CPU (B, K, *data) tensors, in one
    pass over eps; each bit-identical to its native_gram call."""
    B, K = eps.shape[0], eps.shape[1]
    gy, gs, eps = (v.contiguous() for v in (gy, gs, eps))
    dL, dU = (torch.empty(B, K, K, dtype=torch.float32) for _ in range(2))
    N = eps[0, 0].numel() if B else 0
    _loaded().sdec_gram2_f32(B, K, N, *_pointers(gy, gs, eps, dL, dU))
    return dL, dU


def native_rate_table(A, D, S0, s, j, radius, anorm, terms, widths):
    """(probs, dens) of the importance table from one C call (sdec_rate_table) for float64 CPU
    A, D, S0 (K, K), s = B(edges) (m,) and widths (m - 1,), or None where kernel_base's own
    path must run (a failed Cholesky factorisation or a bin whose mass is not > 0)."""
    # a detach only where a graph is attached (the training step's A, D come without one)
    A, D, S0, s, widths = ((v.detach() if v.requires_grad else v).contiguous() for v in (A, D, S0, s, widths))
    probs, dens = torch.empty_like(widths), torch.empty_like(widths)
    rc = _loaded().sdec_rate_table(A.shape[-1], terms, j, radius, anorm, s.shape[0],
                                   *_pointers(A, D, S0, s, widths, probs, dens))
    if rc < 0:
        raise MemoryError("sdec native pipeline: out of memory")
    return (probs, dens) if rc == 0 else None


def native_terms_ok(model, target, GG):
    """Whether native_terms runs: float32 CPU scores and G Gᵀ, and the library (as loaded: the
    caller, the fused ELBO path, chose the native path for this call, see _loaded)."""
    return (all(v.dtype == torch.float32 and v.device.type == "cpu" for v in (model, GG))
            and (target is None or (target.dtype == torch.float32 and target.device.type == "cpu"))
            and _loaded() is not None)


def native_terms(scalars, model, target, GG, x, weight, aux_value):
    """The ELBO's per-example terms in one C call (sdec_terms_forward; see kernel_base._Terms):
    (diff, gram, sq, (prior, score, norm, div, trunc, total, aux)) for float32 CPU inputs
    (native_terms_ok); diff is model itself when target is None, sq = |x|² per example, aux
    the float aux_value per example."""
    n, K = GG.shape[0], GG.shape[1]
    model, GG, scalars, x, weight = (v.contiguous() for v in (model, GG, scalars, x, weight))
    if target is None:
        diff = model.reshape(n, K, -1)
    else:
        target = target.contiguous()
        diff = torch.empty(n, K, math.prod(model.shape[1:]) // K if n else 0, dtype=torch.float32)
    gram = torch.empty(n, K, K, dtype=torch.float32)
    sq, aux, *outs = (torch.empty(n, dtype=torch.float32) for _ in range(8))
    N = diff.shape[2]
    if n and math.prod(x.shape[1:]) != N:
        raise ValueError(f"native_terms: x has {math.prod(x.shape[1:])} values per example, the scores {N}")
    _loaded().sdec_terms_forward(n, K, N, *_pointers(model), _maybe_ptr(target),
                                 *_pointers(GG, scalars, x, weight), float(aux_value),
                                 *_pointers(diff, gram, sq, aux, *outs))
    return diff, gram, sq, (*outs, aux)


def native_terms_backward(grads, diff, GG, gram, sq, weight, want_scalars, want_diff, negate, want_GG):
    """(d scalars, d diff, d GG), each None unless wanted, of native_terms for the gradients of
    its six outputs (each None or (n,) float32), in one C call; d diff negated when negate."""
    n, K, N = diff.shape
    d_sc = torch.empty(5, dtype=torch.float32) if want_scalars else None
    d_diff = torch.empty_like(diff) if want_diff else None
    d_GG = torch.empty_like(GG) if want_GG else None
    grads = [None if g is None else g.contiguous() for g in grads]  # held through the call
    _loaded().sdec_terms_backward(n, K, N, *[_maybe_ptr(g) for g in grads],
                                  *_pointers(diff, GG, gram, sq, weight), int(negate),
                                  *[_maybe_ptr(v) for v in (d_sc, d_diff, d_GG)])
    return d_sc, d_diff, d_GG


def native_gram_form_backward(g, GG, gram, diff, want_GG):
    """(d diff, d GG or None) of q = Σ_ij GG_ij gram_ij, gram = diff diffᵀ per example, for the
    float32 CPU tensors of native_gram's forward (g (B,), GG and gram (B, K, K), diff (B, K, *data)):
    d diff = (g (GG + GGᵀ)) diff, d GG = g gram, in one C call."""
    g, GG, gram, diff = (v.contiguous() for v in (g, GG, gram, diff))
    d_diff = torch.empty_like(diff)
    d_GG = torch.empty_like(GG) if want_GG else None
    B, K = diff.shape[0], diff.shape[1]
    N = diff[0, 0].numel() if B and K else 0
    _loaded().sdec_gram_form_backward(B, K, N, *_pointers(g, GG, gram, diff, d_diff),
                                      _maybe_ptr(d_GG))
    return d_diff, d_GG


def native_norm2(A):
    """||A||₂ of a (K, K) float64 CPU matrix (its largest singular value) as a float."""
    A = A.detach().contiguous()
    value = _loaded().sdec_norm2(A.shape[-1], *_pointers(A))
    if value < 0:
        raise MemoryError("sdec native pipeline: out of memory")
    return value


def native_param_values(entries, Qfix, Dfix, negP, theta):
    """The native map's values without a graph: (Q, D, S, A, ‖A‖₂) from one C call
    (sdec_param_map) for float64 CPU contiguous tensors (see NativeParamMap)."""
    K = negP.shape[-1]
    Q, D, S, A = (negP.new_empty(K, K) for _ in range(4))
    ptrs = (ctypes.c_void_p * len(theta))(*_pointers(*theta))
    norm = _loaded().sdec_param_map(K, entries.shape[0], _ptr(entries), ptrs, _maybe_ptr(Qfix),
                                    _maybe_ptr(Dfix), _ptr(negP), *_pointers(Q, D, S, A))
    if norm < 0:
        raise MemoryError("sdec native pipeline: out of memory")
    return Q, D, S, A, norm


def native_prepare(entries, Qfix, Dfix, negP, theta, S0, terms, tau, s_T, s, widths):
    """A training step's native map values and importance table from one C call
    (sdec_elbo_prepare): (D, S, A, ‖A‖₂, probs, dens) as native_param_values' and
    native_rate_table's, for the series settings kernel_base derives from ‖A‖₂ (radius tau / ‖A‖₂,
    the doublings for s up to s_T); or None where the caller's own path must run (‖A‖₂ not
    finite, a failed Cholesky factorisation or a bin whose mass is not > 0)."""
    K, m = negP.shape[-1], s.shape[0]
    Q, D, S, A = negP.new_empty(4, K, K).unbind(0)
    probs, dens = s.new_empty(2, m - 1).unbind(0)
    norm = (ctypes.c_double * 1)()
    rc = _loaded().sdec_elbo_prepare(
        K, entries.shape[0], _ptr(entries), (ctypes.c_void_p * len(theta))(*_pointers(*theta)), _maybe_ptr(Qfix),
        _maybe_ptr(Dfix), *_pointers(negP, S0), terms, tau, s_T, m, *_pointers(s, widths, Q, D, S, A, probs, dens),
        norm)
    if rc < 0:
        raise MemoryError("sdec native pipeline: out of memory")
    return (D, S, A, norm[0], probs, dens) if rc == 0 else None


def _param_map_backward(entries, negP, S, theta, gQ, gD, gA):
    """The native map's adjoint (sdec_param_map_backward): the gradient of each raw parameter
    in theta from those of Q, D and A (each None or a (K, K) float64 tensor)."""
    grads = [None if g is None else g.contiguous() for g in (gQ, gD, gA)]  # held through the call
    out = [torch.empty_like(v) for v in theta]
    rc = _loaded().sdec_param_map_backward(
        negP.shape[-1], entries.shape[0], _ptr(entries), (ctypes.c_void_p * len(theta))(*_pointers(*theta)),
        *_pointers(S, negP), *[_maybe_ptr(g) for g in grads], (ctypes.c_void_p * len(out))(*_pointers(*out)))
    if rc != 0:
        raise MemoryError("sdec native pipeline: out of memory")
    return out


class NativeParamMap(torch.autograd.Function):
    """(entries, Qfix, Dfix, -P, *theta) -> Q, D, A (K x K float64) and ‖A‖₂ (a float): the
    generated module's learned blocks (its _param_map, see kernel_base._native_mapped) as one
    graph node instead of the torch ops of its _blocks (index_put, softplus, W - Wᵀ, S Sᵀ, the
    product with -P: some twenty ATen ops and their backward nodes per training step).
    entries: (m, 5) int32 (param, offset, target, row * K + col, transform; see
    sdec_param_map); Qfix / Dfix the fixed block or None.  Gradients reach theta only.
    forward takes ctx, as NativeKernels (no per-call signature binding)."""

    @staticmethod
    def forward(ctx, entries, Qfix, Dfix, negP, *theta):
        Q, D, S, A, norm = native_param_values(entries, Qfix, Dfix, negP, theta)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(entries, negP, S, *theta)
        return Q, D, A, norm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gQ, gD, gA, _gnorm):
        entries, negP, S, *theta = ctx.saved_tensors
        return None, None, None, None, *_param_map_backward(entries, negP, S, theta, gQ, gD, gA)


def native_param_map(entries, Qfix, Dfix, negP, theta):
    """NativeParamMap.apply (see _applied) for float64 CPU contiguous tensors."""
    return _applied(NativeParamMap, entries, Qfix, Dfix, negP, *theta)
