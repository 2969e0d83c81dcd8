"""The native K x K pipeline and state apply: a small C library (kernel_native.c) called
through ctypes.

NativeKernels: Φ, Σ, L = chol Σ, L⁻¹ and log det Σ for a batch of s = B(t), and their exact
reverse-mode adjoint into A and D, in one call each.  The torch path issues a few hundred
small ATen ops (series coefficients, Taylor products, squarings, Cholesky, triangular
solves) and as many backward nodes per learned ELBO step, each a few µs of dispatch on a
3 x 3 matrix.  The C code runs the same method (the series about s = 0 where |s| <= radius,
else the series at s 2^-j and j doublings; see kernel_base) in float64 loops, with the terms
each element needs (terms_at in the C source), and agrees with the torch path to rounding
(tests/test_native.py).

native_apply: y[:, i] = Σ_j M[:, i, j] y[:, j] + col[:, i] x for float32 CPU states in one pass
over the data; native_gram: the per-example products Σ_n g_i y_j of its matrix gradient.
native_apply2 / native_gram2: the perturbation's two applies (y and the score) and their two
matrix gradients, each pair in one pass over ε.  native_norm2: ‖A‖₂ (one-sided Jacobi).

The library is compiled once per machine with the C compiler ($CC, default cc) into the
compiled-module cache ($SDEC_CACHE, else <tmp>/sdec-cache-<uid>), named by the hash of its
source, compiler and platform.  Without a compiler (or with SDEC_NATIVE=0) the torch path
runs, with one warning when building failed.  CPU only.
"""
import ctypes
import hashlib
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
    lib.sdec_kernels_forward.argtypes = [i, i, i, d, d, i] + [p] * 10
    lib.sdec_kernels_backward.argtypes = [i, i, i, d, d, i] + [p] * 13
    lib.sdec_kernels_forward.restype = lib.sdec_kernels_backward.restype = i
    lib.sdec_apply_f32.argtypes = [i, i, ctypes.c_long, p, i, p, p, p, i, p]
    lib.sdec_apply_f32.restype = None
    lib.sdec_gram_f32.argtypes = [i, i, i, ctypes.c_long, p, p, i, p]
    lib.sdec_gram_f32.restype = None
    lib.sdec_apply2_f32.argtypes = [i, i, ctypes.c_long] + [p] * 7
    lib.sdec_apply2_f32.restype = None
    lib.sdec_gram2_f32.argtypes = [i, i, ctypes.c_long] + [p] * 5
    lib.sdec_gram2_f32.restype = None
    lib.sdec_norm2.argtypes = [i, p]
    lib.sdec_norm2.restype = d
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


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _pointers(*tensors):
    """The data pointers of plain CPU tensors; a clear error for the storage-less tensors of
    torch.func transforms, which the C code cannot read."""
    try:
        return [_ptr(v) for v in tensors]
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
        lib = native_library()
        A, D, S0, s = (v.contiguous() for v in (A, D, S0, s))
        K, m = A.shape[-1], s.shape[0]
        Phi, Sig, L, Li = (A.new_empty(m, K, K) for _ in range(4))
        hld = A.new_empty(m)
        ok = torch.empty(m, dtype=torch.int32)
        rc = lib.sdec_kernels_forward(K, terms, j, radius, anorm, m,
                                      *_pointers(A, D, S0, s, Phi, Sig, L, Li, hld, ok))
        if rc != 0:
            raise MemoryError("sdec native pipeline: out of memory")
        ctx.save_for_backward(A, D, S0, s, L, Li)
        ctx.j, ctx.radius, ctx.anorm, ctx.terms = j, radius, anorm, terms
        ctx.mark_non_differentiable(ok)
        return Phi, Sig, L, Li, hld, ok

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gPhi, gSig, gL, gLi, ghld, _gok):
        lib = native_library()
        A, D, S0, s, L, Li = (v.contiguous() for v in ctx.saved_tensors)
        grads = [g.to(torch.float64).contiguous() for g in (gPhi, gSig, gL, gLi, ghld)]
        gA, gD = torch.zeros_like(A), torch.zeros_like(D)
        rc = lib.sdec_kernels_backward(A.shape[-1], ctx.terms, ctx.j, ctx.radius, ctx.anorm, s.shape[0],
                                       *_pointers(A, D, S0, s, L, Li, *grads, gA, gD))
        if rc != 0:
            raise MemoryError("sdec native pipeline: out of memory")
        return gA, gD, None, None, None, None, None, None


def native_kernels(A, D, S0, s, j, radius, anorm, terms):
    """NativeKernels.apply, with an error that says what to do under torch.func transforms."""
    try:
        return NativeKernels.apply(A, D, S0, s, j, radius, anorm, terms)
    except RuntimeError as err:
        if "functorch transforms" not in str(err):
            raise
        raise RuntimeError(_FUNC_HINT.format(err=err)) from None


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
                       None if col is None else _ptr(col), None if x is None else _ptr(x),
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
    lib = native_library()
    if lib is None:
        return None
    B, Ka, Kc = a.shape[0], a.shape[1], c.shape[1]
    a, c = a.contiguous(), c.contiguous()
    out = torch.empty(B, Ka, Kc, dtype=torch.float32)
    N = a[0, 0].numel() if B and Ka else 0
    lib.sdec_gram_f32(B, Ka, Kc, N, _ptr(a), _ptr(c), _TRI[tri], _ptr(out))
    return out


def native_apply2_ok(L, U, col, x, eps):
    """Whether native_apply2 runs on these: float32 CPU tensors L, U (B, K, K), col (B, K),
    x (B, *data), eps (B, K, *data), K >= 2, and the library is available."""
    if any(v.dtype != torch.float32 or v.device.type != "cpu" for v in (L, U, col, x, eps)):
        return False
    B, K = eps.shape[0], eps.shape[1] if eps.dim() >= 2 else 0
    return (K >= 2 and L.shape == (B, K, K) and U.shape == (B, K, K) and col.shape == (B, K)
            and x.shape == (B,) + tuple(eps.shape[2:]) and native_library() is not None)


def native_apply2(L, U, col, x, eps):
    """(y, s) = (L eps + col x, U eps) per example in one pass over eps (L lower, U upper; see
    native_apply2_ok for what it takes), bit-identical to two native_apply calls."""
    L, U, col, x, eps = (v.contiguous() for v in (L, U, col, x, eps))
    y, s = torch.empty_like(eps), torch.empty_like(eps)
    B, N = eps.shape[0], eps[0, 0].numel() if eps.shape[0] else 0
    native_library().sdec_apply2_f32(B, eps.shape[1], N, *_pointers(L, U, col, x, eps, y, s))
    return y, s


def native_gram2(gy, gs, eps):
    """(tril(gy epsᵀ), triu(gs epsᵀ)) per example for float32 CPU (B, K, *data) tensors, in one
    pass over eps; each bit-identical to its native_gram call."""
    B, K = eps.shape[0], eps.shape[1]
    gy, gs, eps = (v.contiguous() for v in (gy, gs, eps))
    dL, dU = (torch.empty(B, K, K, dtype=torch.float32) for _ in range(2))
    N = eps[0, 0].numel() if B else 0
    native_library().sdec_gram2_f32(B, K, N, *_pointers(gy, gs, eps, dL, dU))
    return dL, dU


def native_norm2(A):
    """||A||₂ of a (K, K) float64 CPU matrix (its largest singular value) as a float."""
    A = A.detach().contiguous()
    value = native_library().sdec_norm2(A.shape[-1], *_pointers(A))
    if value < 0:
        raise MemoryError("sdec native pipeline: out of memory")
    return value
