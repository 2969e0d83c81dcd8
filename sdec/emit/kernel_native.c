/* sdec's native K x K pipeline and state apply (loaded by kernel_native.py; the method is
   kernel_base.py's, whose module doc has the numerics).

   For a batch of s = B(t), from A, D (K x K, float64, row-major) and Sigma0:
     Phi(s), Sigma(s), L = chol Sigma, L^-1 and sum_k log L_kk,
   by the same method as kernel_base's torch path (the Taylor series about s = 0 where
   |s| <= radius, else the series of E = Phi - I at h = s 2^-ji and ji doublings of E, ji the
   element's own (doublings); each series with the terms its element needs, series_weights; the
   chain again in double-double where the double one may have lost digits, needs_dd), and
   the reverse-mode adjoint of all five outputs with respect to A and D.  After them: the float32 state apply and its gradient's products
   (single and paired), and ||A||_2.

   Series coefficients: P_k = A^k, M_k (from Sigma0) and N_k (from 0):
     M_0 = Sigma0, M_1 = A Sigma0 + Sigma0 A^T + 2 D, M_{k+1} = A M_k + M_k A^T,
   each M_{k+1} formed as X + X^T with X = A M_k, so every M_k is exactly symmetric.
   They are formed from A / a and D / a, with a = 2^e the power of two just above ||A||_2
   (series_scale), and weighted by (a h)^k / k!: dividing by a power of two is exact, so
   every term w_k C_k is the same double as unscaled, but A^k no longer overflows float64
   for ||A||_2 above about 2e6 (nor underflows for a small ||A||_2).
   No jitter: a Sigma whose Cholesky pivot is not > 0 (or not finite) sets ok[i] = 0. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* Z = beta Z + op(X) op(Y), op = transpose when tx / ty; beta = 0 does not read Z (which may
   be uninitialised: the squaring chain's kept buffers) */
INLINE void gemm(int K, int tx, const double *X, int ty, const double *Y, double beta, double *Z)
{
    for (int i = 0; i < K; i++)
        for (int j = 0; j < K; j++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++)
                acc += (tx ? X[k * K + i] : X[i * K + k]) * (ty ? Y[j * K + k] : Y[k * K + j]);
            Z[i * K + j] = (beta == 0.0) ? acc : beta * Z[i * K + j] + acc;
        }
}

INLINE void axpy(int n, double a, const double *restrict x, double *restrict y)
{
    for (int i = 0; i < n; i++)
        y[i] += a * x[i];
}

/* The adjoint's accumulation, gX[k] += w[k] x and gY[k] += w[k] y for k < n (K x K each, KK
   entries): two lanes at a time (GCC / Clang vector extensions, any target; elementwise, so the
   same doubles as the scalar axpy loops it replaces), both accumulations in one pass over k. */
typedef double v2d __attribute__((vector_size(16)));

INLINE void accumulate(int KK, int n, const double *restrict w, const double *restrict x,
                       const double *restrict y, double *restrict gX, double *restrict gY)
{
    for (int k = 0; k < n; k++) {
        v2d wv = {w[k], w[k]};
        double *X = gX + k * KK, *Y = gY + k * KK;
        int e = 0;
        for (; e + 2 <= KK; e += 2) {
            v2d a, b, c, d;
            memcpy(&a, x + e, sizeof a);
            memcpy(&b, X + e, sizeof b);
            memcpy(&c, y + e, sizeof c);
            memcpy(&d, Y + e, sizeof d);
            b += wv * a;
            d += wv * c;
            memcpy(X + e, &b, sizeof b);
            memcpy(Y + e, &d, sizeof d);
        }
        for (; e < KK; e++) {
            X[e] += w[k] * x[e];
            Y[e] += w[k] * y[e];
        }
    }
}

/* coefficients: P, M, N each (n, K, K) */
INLINE void coefficients(int K, int n, const double *A, const double *D, const double *S0,
                         double *P, double *M, double *N, double *X)
{
    int KK = K * K;
    memset(P, 0, sizeof(double) * KK);
    for (int i = 0; i < K; i++)
        P[i * K + i] = 1.0;
    for (int k = 1; k < n; k++)
        gemm(K, 0, A, 0, P + (k - 1) * KK, 0.0, P + k * KK);
    for (int which = 0; which < 2; which++) {
        double *C = which ? N : M;
        if (which)
            memset(C, 0, sizeof(double) * KK);
        else
            memcpy(C, S0, sizeof(double) * KK);
        if (n < 2)
            continue;
        gemm(K, 0, A, 0, C, 0.0, X);
        for (int i = 0; i < K; i++)
            for (int j = 0; j < K; j++)
                C[KK + i * K + j] = X[i * K + j] + X[j * K + i] + 2.0 * D[i * K + j];
        for (int k = 2; k < n; k++) {
            gemm(K, 0, A, 0, C + (k - 1) * KK, 0.0, X);
            for (int i = 0; i < K; i++)
                for (int j = 0; j < K; j++)
                    C[k * KK + i * K + j] = X[i * K + j] + X[j * K + i];
        }
    }
}

/* a = 2^e with ||A||_2 = f 2^e, f in [0.5, 1): A / a has norm in [0.5, 1), and scaling by it
   is exact (1 where the norm is 0 or not finite) */
INLINE double series_scale(double anorm)
{
    int e = 0;
    if (!(anorm > 0.0) || !isfinite(anorm))
        return 1.0;
    frexp(anorm, &e);
    return ldexp(1.0, e);
}

/* the scaled coefficients' inputs: As = A / a, Ds = D / a (K x K each) */
INLINE void scaled_inputs(int K, double a, const double *A, const double *D, double *As, double *Ds)
{
    for (int i = 0; i < K * K; i++) {
        As[i] = A[i] / a;
        Ds[i] = D[i] / a;
    }
}

/* 1 / k, rounded once at compile time: the running products below multiply by it instead of
   dividing by k (a division's latency on every step of a dependent chain was most of the
   per-element time of a batch) */
#define RECIP_MAX 64
static const double RECIP[RECIP_MAX + 1] = {
    0.0, 1.0 / 1, 1.0 / 2, 1.0 / 3, 1.0 / 4, 1.0 / 5, 1.0 / 6, 1.0 / 7, 1.0 / 8, 1.0 / 9,
    1.0 / 10, 1.0 / 11, 1.0 / 12, 1.0 / 13, 1.0 / 14, 1.0 / 15, 1.0 / 16, 1.0 / 17, 1.0 / 18,
    1.0 / 19, 1.0 / 20, 1.0 / 21, 1.0 / 22, 1.0 / 23, 1.0 / 24, 1.0 / 25, 1.0 / 26, 1.0 / 27,
    1.0 / 28, 1.0 / 29, 1.0 / 30, 1.0 / 31, 1.0 / 32, 1.0 / 33, 1.0 / 34, 1.0 / 35, 1.0 / 36,
    1.0 / 37, 1.0 / 38, 1.0 / 39, 1.0 / 40, 1.0 / 41, 1.0 / 42, 1.0 / 43, 1.0 / 44, 1.0 / 45,
    1.0 / 46, 1.0 / 47, 1.0 / 48, 1.0 / 49, 1.0 / 50, 1.0 / 51, 1.0 / 52, 1.0 / 53, 1.0 / 54,
    1.0 / 55, 1.0 / 56, 1.0 / 57, 1.0 / 58, 1.0 / 59, 1.0 / 60, 1.0 / 61, 1.0 / 62, 1.0 / 63,
    1.0 / 64
};

INLINE double recip(int k)
{
    return k <= RECIP_MAX ? RECIP[k] : 1.0 / k;
}

/* The terms of the series at h and their weights.  The count: the first k with
   (2 x)^k / k! <= 1e-24, x = |h| ||A||_2 (the global truncation bound of the 48-term series at
   s ||A||_2 = 3, kernel_base's doc), plus 2 K - 1 terms, the highest order at which an entry
   of Sigma can start (structurally small entries such as CLD's s^3 keep that bound relative to
   their own leading term); at most n.  The weights w_k = ah^k / k! (ah = a h, the scaled
   coefficients' argument) by the running product w_k = w_(k-1) (ah (1 / k)).  The two
   running products are one loop, each held in a register: side by side rather than one
   after the other. */
INLINE int series_weights(int K, int n, double h, double anorm, double ah, double *w)
{
    double x2 = 2.0 * fabs(h) * anorm, b = 1.0, v = 1.0;
    int k = 0;
    w[0] = 1.0;
    while (k < n && b > 1e-24) {
        double r = recip(++k);
        b *= x2 * r;
        v *= ah * r;
        if (k < n)
            w[k] = v;
    }
    int total = k + 2 * K - 1 < n ? k + 2 * K - 1 : n;
    for (int q = k + 1; q < total; q++) {
        v *= ah * recip(q);
        w[q] = v;
    }
    return total;
}

/* The doublings of an element above the series radius: the fewest ji with |s| 2^-ji <= radius
   (its own, not the batch's j: an element squared more often than it needs loses accuracy
   with every doubling, which a stiff process makes visible), at most j (the buffers' size). */
INLINE int doublings(double s, double radius, int j)
{
    double top = fabs(s) / radius;
    int ji = top > 1.0 ? (int)ceil(log2(top)) : 0;
    while (ji < j && ldexp(fabs(s), -ji) > radius)
        ji++;
    return ji < j ? ji : j;
}

/* out = sum_k w_k C_k, two lanes at a time (see accumulate): the same doubles, in the same
   order, as the scalar loop */
INLINE void series(int K, int n, const double *restrict w, const double *restrict C, double *restrict out)
{
    int KK = K * K;
    if (KK > 16) {
        memset(out, 0, sizeof(double) * KK);
        for (int k = 0; k < n; k++)
            axpy(KK, w[k], C + k * KK, out);
        return;
    }
    v2d acc[8];
    double tail = 0.0;
    for (int e = 0; e + 2 <= KK; e += 2)
        acc[e / 2] = (v2d){0.0, 0.0};
    for (int k = 0; k < n; k++) {
        v2d wv = {w[k], w[k]};
        const double *Ck = C + k * KK;
        for (int e = 0; e + 2 <= KK; e += 2) {
            v2d c;
            memcpy(&c, Ck + e, sizeof c);
            acc[e / 2] += wv * c;
        }
        if (KK & 1)
            tail += w[k] * Ck[KK - 1];
    }
    for (int e = 0; e + 2 <= KK; e += 2)
        memcpy(out + e, &acc[e / 2], sizeof acc[0]);
    if (KK & 1)
        out[KK - 1] = tail;
}

/* out = I + E (K x K) */
INLINE void plus_identity(int K, const double *E, double *out)
{
    memcpy(out, E, sizeof(double) * K * K);
    for (int i = 0; i < K; i++)
        out[i * K + i] += 1.0;
}

/* the squaring chain at h: Pc[l], Sc[l] for l = 0..j, where Pc[l] = E(h 2^l) = Phi(h 2^l) - I
   and Sc[l] the noise part; ah = a h, the weights' argument for the scaled coefficients P, N
   (a = series_scale).  E(h) is the series without its k = 0 term, and it is E that doubles,
   E(2h) = 2 E + E E, and Sn(2h) = Sn + X + X E^T with X = Sn + E Sn (= Sn + Phi Sn Phi^T):
   in a direction that decays slowly over h, Phi(h) = I + E rounds E's digits away and each
   squaring of Phi doubles that loss, while E keeps them (a stiff spectrum, eigenvalues -4.5e6
   and -0.036, lost 4x more in Sigma's own scale over 19 doublings of Phi). */
INLINE void chain(int K, int n, int j, const double *P, const double *N, const double *w,
                  double *Pc, double *Sc, double *X)
{
    int KK = K * K;  /* n: the terms at h and w their weights (series_weights) */
    series(K, n - 1, w + 1, P + KK, Pc);
    series(K, n, w, N, Sc);
    for (int l = 0; l < j; l++) {
        const double *El = Pc + l * KK, *Sl = Sc + l * KK;
        double *Sn = Sc + (l + 1) * KK, *En = Pc + (l + 1) * KK;
        memcpy(X, Sl, sizeof(double) * KK);
        gemm(K, 0, El, 0, Sl, 1.0, X);           /* X = Sn + E Sn */
        for (int e = 0; e < KK; e++)
            Sn[e] = Sl[e] + X[e];
        gemm(K, 0, X, 1, El, 1.0, Sn);           /* + X E^T */
        for (int e = 0; e < KK; e++)
            En[e] = 2.0 * El[e];
        gemm(K, 0, El, 0, El, 1.0, En);          /* + E E */
    }
}

/* L = chol(S) (lower), Li = L^-1 (unless Li is NULL); returns 0 on a pivot that is not > 0 */
INLINE int cholesky(int K, const double *S, double *L, double *Li, double *half_logdet)
{
    memset(L, 0, sizeof(double) * K * K);
    if (Li)
        memset(Li, 0, sizeof(double) * K * K);
    double h = 0.0;
    for (int j = 0; j < K; j++) {
        double d = S[j * K + j];
        for (int k = 0; k < j; k++)
            d -= L[j * K + k] * L[j * K + k];
        if (!(d > 0.0) || !isfinite(d))
            return 0;
        double r = sqrt(d);
        L[j * K + j] = r;
        if (half_logdet)
            h += log(r);
        for (int i = j + 1; i < K; i++) {
            double v = S[i * K + j];
            for (int k = 0; k < j; k++)
                v -= L[i * K + k] * L[j * K + k];
            L[i * K + j] = v / r;
        }
    }
    if (half_logdet)
        *half_logdet = h;
    if (!Li)
        return 1;
    for (int c = 0; c < K; c++) { /* forward substitution, column c of L^-1 */
        for (int i = c; i < K; i++) {
            double v = (i == c) ? 1.0 : 0.0;
            for (int k = c; k < i; k++)
                v -= L[i * K + k] * Li[k * K + c];
            Li[i * K + c] = v / L[i * K + i];
        }
    }
    return 1;
}

/* ---- the squaring chain in double-double, where the double chain may have lost digits ----
   A doubling E <- 2 E + E E carries an error d of E on as d Phi + Phi d (Phi = I + E), so
   through ji doublings an error of the series at h grows by up to prod_l 2 ||Phi_l||: 2^ji
   where a direction barely decays (||Phi_l|| ~ 1), far more where Phi is non-normal and
   grows on the way (||Phi_l|| ~ 100).  Two specs the property strategies drew: K = 6 with
   ||A||_2 = 6.0e4 and B(T) = 29.7 (20 doublings) had Phi(T) 1.5e-10 off a 60-digit expm of
   the same float64 A (the double series alone gave 7.9e-11, the double doublings of the exact
   E(h) 4.3e-11); K = 4 with ||A||_2 = 9.8e3 and eigenvalues of modulus <= 48 (entries of Phi
   up to 98) had Phi(0.2) 1.5e-8 off after 11 doublings.  Where that growth, measured on the
   double chain's own levels (needs_dd), exceeds DD_GROWTH times max(1, ||Phi||) -- an error
   of the series rounding (u = 2^-53) grown past 2^11 u relative to Phi -- the element's
   coefficients, series and doublings are run again in double-double (a value is hi + lo;
   the exact product by fma, sums by Dekker's add2, whose error is about 2^-104 of the
   operands) and Phi, Sigma rounded to double once at the end; the levels kept for the
   adjoint are their rounded copies.  Both specs' Phi then equal the reference rounded (within
   1e-14).  Every shipped spec stays in double (at most 3 doublings, growth at most
   16 max(1, ||Phi||)): bit for bit what it was.  Cost where it runs: about 8x the double
   chain (0.27 -> 2.2 ms for 130 times of a K = 4 spec with 15 to 20 doublings). */
#define DD_GROWTH 2048.0

typedef struct {
    double hi, lo;
} dd;

INLINE dd dd_two_sum(double a, double b)
{
    double s = a + b, v = s - a;
    return (dd){s, (a - (s - v)) + (b - v)};
}

INLINE dd dd_fast(double a, double b) /* |a| >= |b| */
{
    double s = a + b;
    return (dd){s, b - (s - a)};
}

INLINE dd dd_add(dd a, dd b)
{
    dd s = dd_two_sum(a.hi, b.hi);
    s.lo += a.lo + b.lo;
    return dd_fast(s.hi, s.lo);
}

INLINE dd dd_mul(dd a, dd b)
{
    double p = a.hi * b.hi, e = fma(a.hi, b.hi, -p);
    e += a.hi * b.lo + a.lo * b.hi;
    return dd_fast(p, e);
}

INLINE dd dd_mul_d(dd a, double b)
{
    double p = a.hi * b, e = fma(a.hi, b, -p);
    e += a.lo * b;
    return dd_fast(p, e);
}

INLINE dd dd_div_d(dd a, double b)
{
    double q = a.hi / b, p = q * b, e = fma(q, b, -p);
    return dd_fast(q, ((a.hi - p) - e + a.lo) / b);
}

/* Z = X op(Y), or Z += X op(Y) when acc, dd K x K; Y transposed when ty */
INLINE void gemm_dd(int K, const dd *X, int ty, const dd *Y, int acc, dd *Z)
{
    for (int i = 0; i < K; i++)
        for (int j = 0; j < K; j++) {
            dd v = acc ? Z[i * K + j] : (dd){0.0, 0.0};
            for (int k = 0; k < K; k++)
                v = dd_add(v, dd_mul(X[i * K + k], ty ? Y[j * K + k] : Y[k * K + j]));
            Z[i * K + j] = v;
        }
}

/* Z = A Y for double A (exact inputs: the scaled coefficients' A / a) and dd Y */
INLINE void gemm_d_dd(int K, const double *A, const dd *Y, dd *Z)
{
    for (int i = 0; i < K; i++)
        for (int j = 0; j < K; j++) {
            dd v = {0.0, 0.0};
            for (int k = 0; k < K; k++)
                v = dd_add(v, dd_mul_d(Y[k * K + j], A[i * K + k]));
            Z[i * K + j] = v;
        }
}

/* the squaring branch's coefficients in dd: P_k = As^k and N_k (from 0: N_1 = 2 Ds,
   N_{k+1} = X + X^T with X = As N_k), k < n */
INLINE void coefficients_dd(int K, int n, const double *As, const double *Ds, dd *P, dd *N, dd *X)
{
    int KK = K * K;
    for (int e = 0; e < KK; e++) {
        P[e] = (dd){(e % (K + 1) == 0) ? 1.0 : 0.0, 0.0};
        N[e] = (dd){0.0, 0.0};
        if (n > 1)
            N[KK + e] = (dd){2.0 * Ds[e], 0.0};
    }
    for (int k = 1; k < n; k++)
        gemm_d_dd(K, As, P + (k - 1) * KK, P + k * KK);
    for (int k = 2; k < n; k++) {
        gemm_d_dd(K, As, N + (k - 1) * KK, X);
        for (int i = 0; i < K; i++)
            for (int j = 0; j < K; j++)
                N[k * KK + i * K + j] = dd_add(X[i * K + j], X[j * K + i]);
    }
}

/* chain() in dd for one element: E(h) and Sn(h) from the n terms at h (weights (a h)^k / k!,
   ah = a h exact), then j doublings; every level rounded to double into Pc[l], Sc[l] (the
   adjoint's copies); the last level's E, S stay in E, S (dd).  T: 3 K x K dd of scratch. */
INLINE void chain_dd(int K, int n, int j, double ah, const dd *P, const dd *N, double *Pc,
                     double *Sc, dd *E, dd *S, dd *T)
{
    int KK = K * K;
    dd w = {1.0, 0.0}, *X = T, *En = T + KK, *Sn = T + 2 * KK;
    for (int e = 0; e < KK; e++) {
        E[e] = (dd){0.0, 0.0};
        S[e] = N[e];
    }
    for (int k = 1; k < n; k++) {
        w = dd_div_d(dd_mul_d(w, ah), (double)k);
        for (int e = 0; e < KK; e++) {
            E[e] = dd_add(E[e], dd_mul(w, P[k * KK + e]));
            S[e] = dd_add(S[e], dd_mul(w, N[k * KK + e]));
        }
    }
    for (int l = 0;; l++) {
        for (int e = 0; e < KK; e++) {
            Pc[l * KK + e] = E[e].hi;
            Sc[l * KK + e] = S[e].hi;
        }
        if (l == j)
            break;
        gemm_dd(K, E, 0, S, 0, X);                 /* X = Sn + E Sn */
        for (int e = 0; e < KK; e++) {
            X[e] = dd_add(X[e], S[e]);
            Sn[e] = dd_add(S[e], X[e]);
        }
        gemm_dd(K, X, 1, E, 1, Sn);                /* + X E^T */
        for (int e = 0; e < KK; e++)
            En[e] = dd_add(E[e], E[e]);
        gemm_dd(K, E, 0, E, 1, En);                /* + E E */
        memcpy(E, En, sizeof(dd) * KK);
        memcpy(S, Sn, sizeof(dd) * KK);
    }
}

/* Phi = I + E and Sigma = sym(Phi S0 Phi^T + Sn) from the dd chain's last level, each
   rounded to double once (Phi may be NULL) */
INLINE void finish_dd(int K, const dd *E, const dd *S, const double *S0, double *Phi, double *Sig, dd *T)
{
    int KK = K * K;
    dd *Pd = T, *X = T + KK, *Y = T + 2 * KK;
    for (int e = 0; e < KK; e++)
        Pd[e] = (e % (K + 1) == 0) ? dd_add(E[e], (dd){1.0, 0.0}) : E[e];
    if (Phi)
        for (int e = 0; e < KK; e++)
            Phi[e] = Pd[e].hi;
    for (int i = 0; i < K; i++)              /* X = Phi S0 */
        for (int j = 0; j < K; j++) {
            dd v = {0.0, 0.0};
            for (int k = 0; k < K; k++)
                v = dd_add(v, dd_mul_d(Pd[i * K + k], S0[k * K + j]));
            X[i * K + j] = v;
        }
    memcpy(Y, S, sizeof(dd) * KK);
    gemm_dd(K, X, 1, Pd, 1, Y);              /* Y = Phi S0 Phi^T + Sn */
    for (int a = 0; a < K; a++)
        for (int b = 0; b < K; b++)
            Sig[a * K + b] = 0.5 * (dd_add(Y[a * K + b], Y[b * K + a]).hi);
}

/* ||I + E||_inf of a K x K E */
INLINE double norm_plus_identity(int K, const double *E)
{
    double top = 0.0;
    for (int i = 0; i < K; i++) {
        double row = 0.0;
        for (int j = 0; j < K; j++)
            row += fabs(E[i * K + j] + (i == j ? 1.0 : 0.0));
        top = row > top ? row : top;
    }
    return top;
}

/* whether the double chain's levels Pc[0..ji] (E = Phi - I) may have grown an error past
   DD_GROWTH max(1, ||Phi||): prod_l 2 ||Phi_l||, l < ji (see DD_GROWTH) */
INLINE int needs_dd(int K, int ji, const double *Pc)
{
    double growth = 1.0, top = norm_plus_identity(K, Pc + ji * K * K);
    for (int l = 0; l < ji; l++)
        growth *= 2.0 * norm_plus_identity(K, Pc + l * K * K);
    return growth > DD_GROWTH * (top > 1.0 ? top : 1.0);
}

typedef struct {
    double *buf, *P, *M, *N, *w, *Pc, *Sc, *X, *Y, *Z, *As, *Ds;
    dd *ddbuf, *Pdd, *Ndd, *Edd, *Sdd, *Tdd;  /* NULL until an element needs the dd chain */
} work;

/* the dd coefficients and scratch, made on the first element that needs them; 0 if out of
   memory */
INLINE int ensure_dd(int K, int n, work *wk)
{
    if (wk->ddbuf)
        return 1;
    int KK = K * K;
    wk->ddbuf = malloc(sizeof(dd) * ((size_t)2 * n * KK + 5 * (size_t)KK));
    if (!wk->ddbuf)
        return 0;
    wk->Pdd = wk->ddbuf;
    wk->Ndd = wk->Pdd + n * KK;
    wk->Edd = wk->Ndd + n * KK;
    wk->Sdd = wk->Edd + KK;
    wk->Tdd = wk->Sdd + KK;
    coefficients_dd(K, n, wk->As, wk->Ds, wk->Pdd, wk->Ndd, wk->Tdd);
    return 1;
}

INLINE int alloc_work(int K, int n, int j, work *wk)
{
    int KK = K * K;
    size_t total = (size_t)KK * (3 * n + 2 * (j + 1) + 5) + n;
    double *buf = calloc(total, sizeof(double));
    if (!buf)
        return 0;
    wk->buf = wk->P = buf;
    wk->M = wk->P + n * KK;
    wk->N = wk->M + n * KK;
    wk->Pc = wk->N + n * KK;
    wk->Sc = wk->Pc + (j + 1) * KK;
    wk->X = wk->Sc + (j + 1) * KK;
    wk->Y = wk->X + KK;
    wk->Z = wk->Y + KK;
    wk->As = wk->Z + KK;
    wk->Ds = wk->As + KK;
    wk->w = wk->Ds + KK;
    wk->ddbuf = wk->Pdd = wk->Ndd = wk->Edd = wk->Sdd = wk->Tdd = NULL;
    return 1;
}

INLINE void free_work(work *wk)
{
    free(wk->ddbuf);
    free(wk->buf);
}

/* returns 0 on success, -1 on allocation failure; hld[i] is formed for i >= hld_from only, the
   rest set NaN (the fused ELBO reads the log dets of t_min and T alone; the batch's logs were
   about 5% of its forward's time) */
INLINE int forward_impl(int K, int n, int j, double radius, double anorm, int m, const double *A,
                         const double *D, const double *S0, const double *s, double *Phi,
                         double *Sig, double *L, double *Li, double *hld, int *ok, double *keep,
                         int hld_from)
{
    int KK = K * K;
    work wk;
    if (!alloc_work(K, n, j, &wk))
        return -1;
    double sc = series_scale(anorm);
    scaled_inputs(K, sc, A, D, wk.As, wk.Ds);
    coefficients(K, n, wk.As, wk.Ds, S0, wk.P, wk.M, wk.N, wk.X);
    for (int i = 0; i < m && i < hld_from; i++)
        hld[i] = NAN;
    for (int i = 0; i < m; i++) {
        double *Ph = Phi ? Phi + i * KK : NULL, *Sg = Sig + i * KK;
        if (fabs(s[i]) <= radius) {
            int ni = series_weights(K, n, s[i], anorm, sc * s[i], wk.w);
            if (Phi)
                series(K, ni, wk.w, wk.P, Ph);
            series(K, ni, wk.w, wk.M, Sg);
        } else {
            int ji = doublings(s[i], radius, j);
            double h = ldexp(s[i], -ji);
            if (keep) { /* the backward reads this element's chain instead of recomputing it */
                wk.Pc = keep + (size_t)i * 2 * (j + 1) * KK;
                wk.Sc = wk.Pc + (j + 1) * KK;
            }
            int nh = series_weights(K, n, h, anorm, sc * h, wk.w);
            chain(K, nh, ji, wk.P, wk.N, wk.w, wk.Pc, wk.Sc, wk.X);
            if (needs_dd(K, ji, wk.Pc)) { /* again in double-double, over the same levels */
                if (!ensure_dd(K, n, &wk)) {
                    free_work(&wk);
                    return -1;
                }
                chain_dd(K, nh, ji, sc * h, wk.Pdd, wk.Ndd, wk.Pc, wk.Sc, wk.Edd,
                         wk.Sdd, wk.Tdd);
                finish_dd(K, wk.Edd, wk.Sdd, S0, Ph, Sg, wk.Tdd);
                ok[i] = cholesky(K, Sg, L + i * KK, Li ? Li + i * KK : NULL, i >= hld_from ? hld + i : NULL);
                continue;
            }
            double *Pj = wk.Z;
            plus_identity(K, wk.Pc + ji * KK, Pj);
            if (Phi)
                memcpy(Ph, Pj, sizeof(double) * KK);
            gemm(K, 0, Pj, 0, S0, 0.0, wk.X);
            memcpy(wk.Y, wk.Sc + ji * KK, sizeof(double) * KK);
            gemm(K, 0, wk.X, 1, Pj, 1.0, wk.Y); /* Y = P S0 P^T + Sn */
            for (int a = 0; a < K; a++)
                for (int b = 0; b < K; b++)
                    Sg[a * K + b] = 0.5 * (wk.Y[a * K + b] + wk.Y[b * K + a]);
        }
        ok[i] = cholesky(K, Sg, L + i * KK, Li ? Li + i * KK : NULL, i >= hld_from ? hld + i : NULL);
    }
    free_work(&wk);
    return 0;
}

/* adjoint of the forward above with respect to A and D (accumulated into gA, gD, which
   the caller zeroes); gPhi, gSig, gL, gLi are (m, K, K), ghld (m).  L and Li are the
   forward's outputs (every ok[i] = 1). */
INLINE int backward_impl(int K, int n, int j, double radius, double anorm, int m, const double *A,
                          const double *D, const double *S0, const double *s, const double *L,
                          const double *Li, const double *gPhi, const double *gSig,
                          const double *gL, const double *gLi, const double *ghld, double *gA,
                          double *gD, const double *keep)
{
    int KK = K * K;
    work wk;
    if (!alloc_work(K, n, j, &wk))
        return -1;
    double *gP = calloc((size_t)3 * n * KK + 4 * KK, sizeof(double));
    if (!gP) {
        free_work(&wk);
        return -1;
    }
    double *gM = gP + n * KK, *gN = gM + n * KK, *gS = gN + n * KK, *Lb = gS + KK;
    double *U = Lb + KK, *V = U + KK;
    /* the adjoint runs in the scaled coefficients' terms: with respect to A / a and D / a,
       whose gradients are sc gA and sc gD (exact); gA, gD are scaled on the way in and out */
    double sc = series_scale(anorm);
    scaled_inputs(K, sc, A, D, wk.As, wk.Ds);
    A = wk.As;
    for (int e = 0; e < KK; e++) {
        gA[e] *= sc;
        gD[e] *= sc;
    }
    coefficients(K, n, A, wk.Ds, S0, wk.P, wk.M, wk.N, wk.X);
    for (int i = 0; i < m; i++) {
        const double *Lm = L + i * KK, *Lim = Li + i * KK;
        /* Lbar: gL (lower part), - L^-T gLi L^-T, and ghld / L_kk on the diagonal */
        gemm(K, 1, Lim, 0, gLi + i * KK, 0.0, wk.X);
        gemm(K, 0, wk.X, 1, Lim, 0.0, Lb);
        for (int a = 0; a < K; a++)
            for (int b = 0; b < K; b++)
                Lb[a * K + b] = (b <= a) ? gL[i * KK + a * K + b] - Lb[a * K + b] : 0.0;
        for (int a = 0; a < K; a++)
            Lb[a * K + a] += ghld[i] / Lm[a * K + a];
        /* Sigma bar = sym(L^-T Phi(L^T Lbar) L^-1) + sym(gSig), Phi = lower part, diagonal halved */
        gemm(K, 1, Lm, 0, Lb, 0.0, U);
        for (int a = 0; a < K; a++)
            for (int b = 0; b < K; b++)
                U[a * K + b] = (b < a) ? U[a * K + b] : (b == a ? 0.5 * U[a * K + b] : 0.0);
        gemm(K, 1, Lim, 0, U, 0.0, V);
        gemm(K, 0, V, 0, Lim, 0.0, U);
        const double *gSg = gSig + i * KK;
        for (int a = 0; a < K; a++)
            for (int b = 0; b < K; b++)
                gS[a * K + b] = 0.5 * (U[a * K + b] + U[b * K + a] + gSg[a * K + b] + gSg[b * K + a]);
        if (fabs(s[i]) <= radius) {
            int ni = series_weights(K, n, s[i], anorm, sc * s[i], wk.w);
            accumulate(KK, ni, wk.w, gPhi + i * KK, gS, gP, gM);
            continue;
        }
        int ji = doublings(s[i], radius, j);
        double h = ldexp(s[i], -ji);
        int nh = series_weights(K, n, h, anorm, sc * h, wk.w); /* the adjoint's weights below too */
        if (keep) { /* the forward's chain for this element, bit for bit what chain() gives */
            wk.Pc = (double *)keep + (size_t)i * 2 * (j + 1) * KK;
            wk.Sc = wk.Pc + (j + 1) * KK;
        } else {
            chain(K, nh, ji, wk.P, wk.N, wk.w, wk.Pc, wk.Sc, wk.X);
            if (needs_dd(K, ji, wk.Pc)) { /* the forward's dd chain, rounded as it kept it */
                if (!ensure_dd(K, n, &wk)) {
                    free(gP);
                    free_work(&wk);
                    return -1;
                }
                chain_dd(K, nh, ji, sc * h, wk.Pdd, wk.Ndd, wk.Pc, wk.Sc, wk.Edd, wk.Sdd, wk.Tdd);
            }
        }
        /* Sigma = sym(P S0 P^T + Sn): Pbar = gPhi + 2 gS P S0 (gS, S0 symmetric), Snbar = gS;
           P = I + E, so Ebar = Pbar */
        double *Pj = wk.Z, *Pl = Lb; /* Lb is free from here on */
        plus_identity(K, wk.Pc + ji * KK, Pj);
        double *Pb = U, *Sb = V;
        gemm(K, 0, gS, 0, Pj, 0.0, wk.X);
        memcpy(Pb, gPhi + i * KK, sizeof(double) * KK);
        gemm(K, 0, wk.X, 0, S0, 1.0, Pb);
        gemm(K, 0, wk.X, 0, S0, 1.0, Pb);
        memcpy(Sb, gS, sizeof(double) * KK);
        for (int l = ji - 1; l >= 0; l--) {
            /* E' = 2 E + E E, i.e. P' = P P with P = I + E, and S' = S + P S P^T, with Pbar',
               Sbar' (Sb symmetric); Ebar = Pbar */
            const double *Sl = wk.Sc + l * KK;
            plus_identity(K, wk.Pc + l * KK, Pl);
            gemm(K, 0, Pb, 1, Pl, 0.0, wk.Y);        /* Pbar' P^T */
            gemm(K, 1, Pl, 0, Pb, 1.0, wk.Y);        /* + P^T Pbar' */
            gemm(K, 0, Sb, 0, Pl, 0.0, wk.X);        /* Sbar' P */
            gemm(K, 0, wk.X, 1, Sl, 1.0, wk.Y);      /* + Sbar' P Sl^T */
            gemm(K, 1, Sb, 0, Pl, 0.0, wk.Z);        /* Sbar'^T P */
            gemm(K, 0, wk.Z, 0, Sl, 1.0, wk.Y);      /* + Sbar'^T P Sl */
            memcpy(Pb, wk.Y, sizeof(double) * KK);
            gemm(K, 1, Pl, 0, wk.X, 1.0, Sb);        /* Sbar = Sbar' + P^T Sbar' P */
        }
        /* E has no k = 0 term, but gP[0] feeds nothing (P_0 = I) */
        accumulate(KK, nh, wk.w, Pb, Sb, gP, gN);
    }
    /* P_{k+1} = A P_k */
    for (int k = n - 2; k >= 0; k--) {
        gemm(K, 0, gP + (k + 1) * KK, 1, wk.P + k * KK, 1.0, gA);
        gemm(K, 1, A, 0, gP + (k + 1) * KK, 1.0, gP + k * KK);
    }
    /* M_{k+1} = A M_k + M_k A^T (k >= 1), M_1 = A S0 + S0 A^T + 2 D; N likewise from 0 */
    for (int which = 0; which < 2; which++) {
        double *gC = which ? gN : gM;
        const double *C = which ? wk.N : wk.M;
        for (int k = n - 2; k >= 1; k--) {
            const double *Gb = gC + (k + 1) * KK, *Ck = C + k * KK;
            gemm(K, 0, Gb, 1, Ck, 1.0, gA);
            gemm(K, 1, Gb, 0, Ck, 1.0, gA);
            gemm(K, 1, A, 0, Gb, 1.0, gC + k * KK);
            gemm(K, 0, Gb, 0, A, 1.0, gC + k * KK);
        }
        if (n < 2)
            continue;
        if (!which) {
            gemm(K, 0, gC + KK, 1, S0, 1.0, gA);
            gemm(K, 1, gC + KK, 0, S0, 1.0, gA);
        }
        for (int a = 0; a < K; a++) /* D symmetric: its adjoint is the symmetric part */
            for (int b = 0; b < K; b++)
                gD[a * K + b] += gC[KK + a * K + b] + gC[KK + b * K + a];
    }
    for (int e = 0; e < KK; e++) {
        gA[e] /= sc;
        gD[e] /= sc;
    }
    free(gP);
    free_work(&wk);
    return 0;
}

/* Entry points: K = 2 and 3 (every shipped spec with auxiliaries) get copies of the code with
   K a constant, whose loops unroll; other K share one copy (more copies cost compile time:
   about 2.5 s each at -O3).  keep (m, 2 (j + 1), K, K), or NULL: the forward stores each
   squaring element's chain there (Pc then Sc), and the backward reads it back instead of
   recomputing it (a third of the adjoint's work).  The forward's Phi and Li may be NULL (not
   formed: the importance table needs Sigma's log det only). */
static int kernels_forward(int K, int n, int j, double radius, double anorm, int m, const double *A,
                           const double *D, const double *S0, const double *s, double *Phi,
                           double *Sig, double *L, double *Li, double *hld, int *ok, double *keep,
                           int hld_from)
{
    if (K == 2)
        return forward_impl(2, n, j, radius, anorm, m, A, D, S0, s, Phi, Sig, L, Li, hld, ok, keep, hld_from);
    if (K == 3)
        return forward_impl(3, n, j, radius, anorm, m, A, D, S0, s, Phi, Sig, L, Li, hld, ok, keep, hld_from);
    return forward_impl(K, n, j, radius, anorm, m, A, D, S0, s, Phi, Sig, L, Li, hld, ok, keep, hld_from);
}

int sdec_kernels_forward(int K, int n, int j, double radius, double anorm, int m, const double *A,
                         const double *D, const double *S0, const double *s, double *Phi,
                         double *Sig, double *L, double *Li, double *hld, int *ok, double *keep)
{
    return kernels_forward(K, n, j, radius, anorm, m, A, D, S0, s, Phi, Sig, L, Li, hld, ok, keep, 0);
}

int sdec_kernels_backward(int K, int n, int j, double radius, double anorm, int m, const double *A,
                          const double *D, const double *S0, const double *s, const double *L,
                          const double *Li, const double *gPhi, const double *gSig,
                          const double *gL, const double *gLi, const double *ghld, double *gA,
                          double *gD, const double *keep)
{
    if (K == 2)
        return backward_impl(2, n, j, radius, anorm, m, A, D, S0, s, L, Li, gPhi, gSig, gL, gLi, ghld, gA, gD, keep);
    if (K == 3)
        return backward_impl(3, n, j, radius, anorm, m, A, D, S0, s, L, Li, gPhi, gSig, gL, gLi, ghld, gA, gD, keep);
    return backward_impl(K, n, j, radius, anorm, m, A, D, S0, s, L, Li, gPhi, gSig, gL, gLi, ghld, gA, gD, keep);
}

/* One elbo() call's process quantities (kernel_native.NativeElboKernels), for m = n + 2 values
   s = B(t): the batch's n times, then t_min and T.  The pipeline above runs on all m (Phi, Sig,
   L, Li, hld, ok: m each; L, Li and Phi are kept for the backward); then, in float32 (f32) or
   float64, for i < n: col[i] = Phi[i][:, 0], Lb[i] = L[i], U[i] = -L[i]^-T, GG[i] = 2 beta[i] D,
   and terms[5]: the prior's constant -d/2 (K log 2pi + log det Sigma_inf + tr(P Sig_T)) and its
   quadratic c^T P c (c = Phi_T[:, 0], P = Sigma_inf^-1), then d times the score norm
   (R(T) - R(t_min)) / 2 with R = 2 hld - 2 tr(A) s, the divergence tr(A) (s_T - s_min) and the
   truncation tr(A) s_min.  Returns 0, 1 (outputs unwritten) where some ok[i] is 0, or -1 if
   out of memory. */
#define STORE(p, f32, i, v) do { if (f32) ((float *)(p))[i] = (float)(v); else ((double *)(p))[i] = (v); } while (0)
#define LOAD(p, f32, i) ((f32) ? (double)((const float *)(p))[i] : ((const double *)(p))[i])

int sdec_elbo_forward(int K, int nterms, int j, double radius, double anorm, int n, const double *A,
                      const double *D, const double *S0, const double *s, const double *beta,
                      const double *P, double log_det_inf, double d, int f32, double *Phi,
                      double *Sig, double *L, double *Li, double *hld, int *ok, void *col,
                      void *Lb, void *U, void *GG, void *terms, double *keep)
{
    int KK = K * K, m = n + 2;
    /* the log dets of t_min and T only (the terms'); the batch's are not formed */
    int rc = kernels_forward(K, nterms, j, radius, anorm, m, A, D, S0, s, Phi, Sig, L, Li, hld, ok, keep, n);
    if (rc != 0)
        return rc;
    for (int i = 0; i < m; i++)
        if (!ok[i])
            return 1;
    for (int i = 0; i < n; i++) {
        const double *Ph = Phi + i * KK, *Lm = L + i * KK, *Lim = Li + i * KK;
        for (int a = 0; a < K; a++) {
            STORE(col, f32, i * K + a, Ph[a * K]);
            for (int b = 0; b < K; b++) {
                int e = i * KK + a * K + b;
                STORE(Lb, f32, e, Lm[a * K + b]);
                STORE(U, f32, e, -Lim[b * K + a]);
                STORE(GG, f32, e, (2.0 * beta[i]) * D[a * K + b]);
            }
        }
    }
    const double *PhT = Phi + (n + 1) * KK, *SgT = Sig + (n + 1) * KK;
    double trA = 0.0, quad = 0.0, tr = 0.0;
    for (int a = 0; a < K; a++) {
        trA += A[a * K + a];
        double Pc = 0.0;
        for (int b = 0; b < K; b++) {
            Pc += P[a * K + b] * PhT[b * K];
            tr += P[a * K + b] * SgT[a * K + b];
        }
        quad += PhT[a * K] * Pc;
    }
    double R0 = 2.0 * hld[n] - 2.0 * trA * s[n], R1 = 2.0 * hld[n + 1] - 2.0 * trA * s[n + 1];
    STORE(terms, f32, 0, -0.5 * d * (K * log(2.0 * 3.14159265358979323846) + log_det_inf + tr));
    STORE(terms, f32, 1, quad);
    STORE(terms, f32, 2, d * (0.5 * (R1 - R0)));
    STORE(terms, f32, 3, d * trA * (s[n + 1] - s[n]));
    STORE(terms, f32, 4, d * trA * s[n]);
    return 0;
}

/* The importance table's bins from the rate's antiderivative R = 2 hld - 2 tr(A) s at the m
   bin edges s = B(t) (kernel_base._build_table): mass[i] = R[i + 1] - R[i], probs = mass / sum,
   dens = probs / widths (m - 1 each).  Returns 0, or 1 where the caller's own path must run (a
   failed Cholesky factorisation or a bin whose mass is not > 0), -1 if out of memory. */
int sdec_rate_table(int K, int nterms, int j, double radius, double anorm, int m, const double *A,
                    const double *D, const double *S0, const double *s, const double *widths,
                    double *probs, double *dens)
{
    int KK = K * K;
    double *buf = malloc(sizeof(double) * ((size_t)2 * m * KK + 2 * (size_t)m));
    int *ok = malloc(sizeof(int) * (size_t)(m > 0 ? m : 1));
    if (!buf || !ok) {
        free(buf);
        free(ok);
        return -1;
    }
    double *Sig = buf, *L = Sig + m * KK, *hld = L + m * KK, *R = hld + m;
    /* Sigma's log det only: no Phi output (the series branch skips it) and no L^-1 */
    int rc = sdec_kernels_forward(K, nterms, j, radius, anorm, m, A, D, S0, s, NULL, Sig, L, NULL, hld, ok, NULL);
    double trA = 0.0, total = 0.0;
    for (int a = 0; a < K; a++)
        trA += A[a * K + a];
    for (int i = 0; rc == 0 && i < m; i++) {
        if (!ok[i])
            rc = 1;
        R[i] = 2.0 * hld[i] - 2.0 * trA * s[i];
    }
    for (int i = 0; rc == 0 && i + 1 < m; i++) {
        probs[i] = R[i + 1] - R[i];
        if (!(probs[i] > 0.0))
            rc = 1;
        total += probs[i];
    }
    for (int i = 0; rc == 0 && i + 1 < m; i++) {
        probs[i] /= total;
        dens[i] = probs[i] / widths[i];
    }
    free(buf);
    free(ok);
    return rc;
}

/* Its adjoint: the gradients of col, Lb, U, GG (each may be NULL: zero) and terms (5, or NULL)
   in the forward's precision are folded into the pipeline's (Phi, Sig, L, Li, hld) gradients,
   whose adjoint is accumulated into gA and gD (zeroed by the caller), with tr(A)'s and GG's own
   terms; then, A being -(Q + D) P, gQ = -gA P and gD -= gA P.  -1 if out of memory. */
int sdec_elbo_backward(int K, int nterms, int j, double radius, double anorm, int n,
                       const double *A, const double *D, const double *S0, const double *s,
                       const double *beta, const double *P, const double *Phi, const double *L,
                       const double *Li, double d, int f32, const void *gcol, const void *gLb,
                       const void *gU, const void *gGG, const void *gterms, double *gA, double *gQ,
                       double *gD, const double *keep)
{
    int KK = K * K, m = n + 2;
    double *gPhi = calloc((size_t)4 * m * KK + m, sizeof(double));
    if (!gPhi)
        return -1;
    double *gSig = gPhi + m * KK, *gL = gSig + m * KK, *gLi = gL + m * KK, *ghld = gLi + m * KK;
    for (int i = 0; i < n; i++)
        for (int a = 0; a < K; a++) {
            if (gcol)
                gPhi[i * KK + a * K] = LOAD(gcol, f32, i * K + a);
            for (int b = 0; b < K; b++) {
                int e = i * KK + a * K + b;
                if (gLb)
                    gL[e] = LOAD(gLb, f32, e);
                if (gU)
                    gLi[e] = -LOAD(gU, f32, i * KK + b * K + a);
                if (gGG)
                    gD[a * K + b] += (2.0 * beta[i]) * LOAD(gGG, f32, e);
            }
        }
    if (gterms) {
        double g[5];
        for (int k = 0; k < 5; k++)
            g[k] = LOAD(gterms, f32, k);
        const double *PhT = Phi + (n + 1) * KK;
        for (int a = 0; a < K; a++) {
            double Pc = 0.0;
            for (int b = 0; b < K; b++) {
                Pc += P[a * K + b] * PhT[b * K];
                gSig[(n + 1) * KK + a * K + b] = (-0.5 * d * g[0]) * P[a * K + b];
            }
            gPhi[(n + 1) * KK + a * K] = (2.0 * g[1]) * Pc; /* P symmetric */
        }
        ghld[n + 1] = d * g[2];
        ghld[n] = -d * g[2];
        double gtrA = d * ((g[3] - g[2]) * (s[n + 1] - s[n]) + g[4] * s[n]);
        for (int a = 0; a < K; a++)
            gA[a * K + a] += gtrA;
    }
    int rc = sdec_kernels_backward(K, nterms, j, radius, anorm, m, A, D, S0, s, L, Li, gPhi, gSig,
                                   gL, gLi, ghld, gA, gD, keep);
    free(gPhi);
    if (rc != 0)
        return rc;
    for (int a = 0; a < K; a++)
        for (int b = 0; b < K; b++) {
            double v = 0.0;
            for (int k = 0; k < K; k++)
                v += gA[a * K + k] * P[k * K + b];
            gQ[a * K + b] = -v;
            gD[a * K + b] -= v;
        }
    return 0;
}

/* The state apply for float32 states: out[b, i] = sum_j mat[b, i, j] y[b, j] + col[b, i] x[b]
   over N data coordinates, for y (B, K, N) and mat (B, K, K) (mat_stride = K K) or one (K, K)
   (mat_stride = 0); col (B, K) and x (B, N) may be NULL; tri = -1 (mat lower triangular),
   1 (upper) or 0 skips the zero triangle.  One pass over the data: each output row is built
   while its inputs are in cache.  apply_one is one example (inlined into each vector clone). */
static inline __attribute__((always_inline))
void apply_one(int K, long N, const float *M, const float *restrict yb, const float *cb,
               const float *restrict xb, int tri, float *restrict ob)
{
    for (int i = 0; i < K; i++) {
        float *restrict o = ob + (long)i * N;
        int j0 = tri > 0 ? i : 0, j1 = tri < 0 ? i : K - 1;
        float m = M[i * K + j0];
        const float *restrict yj = yb + (long)j0 * N;
        for (long n = 0; n < N; n++)
            o[n] = m * yj[n];
        if (xb) {
            float c = cb[i];
            for (long n = 0; n < N; n++)
                o[n] += c * xb[n];
        }
        for (int j = j0 + 1; j <= j1; j++) {
            m = M[i * K + j];
            yj = yb + (long)j * N;
            for (long n = 0; n < N; n++)
                o[n] += m * yj[n];
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))  /* the vector width torch's own kernels use */
#endif
void sdec_apply_f32(int B, int K, long N, const float *mat, int mat_stride,
                    const float *restrict y, const float *col, const float *restrict x, int tri,
                    float *restrict out)
{
    for (int b = 0; b < B; b++)
        apply_one(K, N, mat + (long)b * mat_stride, y + (long)b * K * N, col ? col + (long)b * K : 0,
                  x ? x + (long)b * N : 0, tri, out + (long)b * K * N);
}

/* The perturbation's two applies in one pass over eps: y[b] = L[b] eps[b] + col[b] x[b]
   (L lower) and s[b] = U[b] eps[b] (U upper), each example's eps read once for both; the
   arithmetic of each is sdec_apply_f32's, so the results are bit-identical to two calls. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void sdec_apply2_f32(int B, int K, long N, const float *L, const float *U, const float *col,
                     const float *restrict x, const float *restrict eps, float *restrict y,
                     float *restrict s)
{
    for (int b = 0; b < B; b++) {
        long o = (long)b * K * N;
        apply_one(K, N, L + (long)b * K * K, eps + o, col + (long)b * K, x + (long)b * N, -1, y + o);
        apply_one(K, N, U + (long)b * K * K, eps + o, 0, 0, 1, s + o);
    }
}

/* Per-example products out[b, i, j] = sum_n a[b, i, n] c[b, j, n] for float32 a (B, Ka, N)
   and c (B, Kc, N) (the gradients of the state apply's matrix and column), in float32 like
   torch's batched products: eight running sums per product (one vector register), added
   pairwise at the end.  tri = -1 / 1 sums only j <= i / j >= i (the rest is left zero).
   gram_one is one example. */
static inline __attribute__((always_inline))
void gram_one(int Ka, int Kc, long N, const float *ab, const float *cb, int tri, float *ob)
{
    for (int i = 0; i < Ka; i++)
        for (int j = 0; j < Kc; j++) {
            float *o = ob + (long)i * Kc + j;
            if ((tri < 0 && j > i) || (tri > 0 && j < i)) {
                *o = 0.0f;
                continue;
            }
            const float *p = ab + (long)i * N, *q = cb + (long)j * N;
            float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            long n = 0;
            for (; n + 8 <= N; n += 8)
                for (int l = 0; l < 8; l++)
                    acc[l] += p[n + l] * q[n + l];
            for (; n < N; n++)
                acc[n % 8] += p[n] * q[n];
            *o = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void sdec_gram_f32(int B, int Ka, int Kc, long N, const float *a, const float *c, int tri,
                   float *out)
{
    for (int b = 0; b < B; b++)
        gram_one(Ka, Kc, N, a + (long)b * Ka * N, c + (long)b * Kc * N, tri, out + (long)b * Ka * Kc);
}

/* The matrix gradients of sdec_apply2_f32 in one pass over eps: dL[b] = tril(gy[b] eps[b]ᵀ)
   and dU[b] = triu(gs[b] eps[b]ᵀ), each bit-identical to its sdec_gram_f32 call. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void sdec_gram2_f32(int B, int K, long N, const float *gy, const float *gs, const float *eps,
                    float *dL, float *dU)
{
    for (int b = 0; b < B; b++) {
        long o = (long)b * K * N, m = (long)b * K * K;
        gram_one(K, K, N, gy + o, eps + o, -1, dL + m);
        gram_one(K, K, N, gs + o, eps + o, 1, dU + m);
    }
}

/* Example b of the quadratic form's gradient (below): d_diff[b] = (sg (GG[b] + GG[b]^T)) diff[b]
   (if d_diff is not NULL) and d_GG[b] = g gram[b] (if d_GG is not NULL); M is K x K scratch. */
static inline __attribute__((always_inline))
void gram_form_grad_one(int K, long N, float g, float sg, int b, const float *GG, const float *gram,
                        const float *restrict diff, float *restrict d_diff, float *d_GG, float *M)
{
    const float *Gb = GG + (long)b * K * K;
    for (int i = 0; i < K; i++)
        for (int j = 0; j < K; j++) {
            float sym = Gb[i * K + j] + Gb[j * K + i];
            M[i * K + j] = sg * sym;
            if (d_GG)
                d_GG[(long)b * K * K + i * K + j] = g * gram[(long)b * K * K + i * K + j];
        }
    if (d_diff)
        apply_one(K, N, M, diff + (long)b * K * N, 0, 0, 0, d_diff + (long)b * K * N);
}

/* The gradient of the ELBO's quadratic form q[b] = sum_ij GG[b, i, j] gram[b, i, j] with
   gram[b] = diff[b] diff[b]^T (kernel_base._GramForm), for float32 (B, K, N) diff:
   d_diff[b] = (g[b] (GG[b] + GG[b]^T)) diff[b] by apply_one, and d_GG[b] = g[b] gram[b] (if
   d_GG is not NULL), each rounded as the torch ops it replaces. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void sdec_gram_form_backward(int B, int K, long N, const float *g, const float *GG,
                             const float *gram, const float *restrict diff, float *restrict d_diff,
                             float *d_GG)
{
    float M[K * K];
    for (int b = 0; b < B; b++)
        gram_form_grad_one(K, N, g[b], g[b], b, GG, gram, diff, d_diff, d_GG, M);
}

/* The ELBO's per-example terms (kernel_base._Terms) for float32 scores (n, K, N): diff = model -
   target (target NULL: model is diff, and diff is not written), gram = diff diff^T (gram_one),
   q = sum_ij gram_ij GG_ij, sq = |x|^2 (x (n, N); summed in double), aux = (float) aux_value,
   and from the five scalars sc (the prior's constant and quadratic, the score norm,
   divergence, truncation): prior = sc0 - (sc1 / 2) sq, score = (-weight / 2) q, the three
   scalars, and total = prior + score + norm + div + trunc + aux, each rounded as the torch ops
   it replaces (q's nine products are summed in row order). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void sdec_terms_forward(int n, int K, long N, const float *model, const float *target, const float *GG,
                        const float *sc, const float *x, const float *weight, double aux_value,
                        float *diff, float *gram, float *sq, float *aux, float *prior, float *score,
                        float *norm, float *div, float *trunc, float *total)
{
    long KN = (long)K * N;
    float half = 0.5f * sc[1], a = (float)aux_value;
    for (int b = 0; b < n; b++) {
        double acc[4] = {0.0, 0.0, 0.0, 0.0}; /* four running sums: not one add's latency per value */
        long e = 0;
        for (; e + 4 <= N; e += 4)
            for (int l = 0; l < 4; l++)
                acc[l] += (double)x[b * N + e + l] * x[b * N + e + l];
        for (; e < N; e++)
            acc[0] += (double)x[b * N + e] * x[b * N + e];
        sq[b] = (float)((acc[0] + acc[2]) + (acc[1] + acc[3]));
        aux[b] = a;
        const float *d = model + b * KN;
        if (target) {
            float *o = diff + b * KN;
            const float *m = model + b * KN, *t = target + b * KN;
            for (long e = 0; e < KN; e++)
                o[e] = m[e] - t[e];
            d = o;
        }
        float *gb = gram + (long)b * K * K;
        gram_one(K, K, N, d, d, 0, gb);
        const float *Gb = GG + (long)b * K * K;
        float q = 0.0f;
        for (int e = 0; e < K * K; e++)
            q += gb[e] * Gb[e];
        prior[b] = sc[0] - half * sq[b];
        score[b] = (-0.5f * weight[b]) * q;
        norm[b] = sc[2];
        div[b] = sc[3];
        trunc[b] = sc[4];
        total[b] = prior[b] + score[b] + norm[b] + div[b] + trunc[b] + aux[b];
    }
}

/* Its adjoint: g (6 pointers, each NULL or n floats: the gradients of prior, score, norm, div,
   trunc, total) -> d_sc (5, or NULL; sums in double), d_diff (or NULL) = gq (GG + GG^T) diff and
   d_GG (or NULL) = gq gram per example, gq = (-weight / 2) g_score; d_diff is negated when neg
   (the target's gradient). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void sdec_terms_backward(int n, int K, long N, const float *g0, const float *g1, const float *g2,
                         const float *g3, const float *g4, const float *g5, const float *diff,
                         const float *GG, const float *gram, const float *sq, const float *weight,
                         int neg, float *d_sc, float *d_diff, float *d_GG)
{
    const float *g[5] = {g0, g1, g2, g3, g4};
    double sums[5] = {0.0, 0.0, 0.0, 0.0, 0.0}, quad = 0.0;
    float M[K * K];
    for (int b = 0; b < n; b++) {
        float gb[5];
        for (int k = 0; k < 5; k++)
            gb[k] = g[k] ? (g5 ? g[k][b] + g5[b] : g[k][b]) : (g5 ? g5[b] : 0.0f);
        for (int k = 0; k < 5; k++)
            sums[k] += gb[k];
        quad += (double)gb[0] * sq[b];
        float gq = (-0.5f * weight[b]) * gb[1];
        gram_form_grad_one(K, N, gq, neg ? -gq : gq, b, GG, gram, diff, d_diff, d_GG, M);
    }
    if (d_sc) {
        d_sc[0] = (float)sums[0];
        d_sc[1] = (float)(-0.5 * quad);
        for (int k = 2; k < 5; k++)
            d_sc[k] = (float)sums[k];
    }
}

/* ||A||_2 of a K x K double matrix A (row-major), its largest singular value, by one-sided
   Jacobi (Hestenes): plane rotations of pairs of columns of a copy of A until every pair is
   orthogonal to rounding (|a_p . a_q| <= eps |a_p| |a_q|); the singular values are then the
   column norms, with a relative accuracy of a few eps.  -1 if out of memory. */
double sdec_norm2(int K, const double *A)
{
    double *U = malloc(sizeof(double) * (size_t)(K > 0 ? K * K : 1));
    if (!U)
        return -1.0;
    memcpy(U, A, sizeof(double) * (size_t)K * K);
    for (int sweep = 0; sweep < 64; sweep++) {
        int rotated = 0;
        for (int p = 0; p < K; p++)
            for (int q = p + 1; q < K; q++) {
                double alpha = 0.0, beta = 0.0, gamma = 0.0;
                for (int k = 0; k < K; k++) {
                    double up = U[k * K + p], uq = U[k * K + q];
                    alpha += up * up;
                    beta += uq * uq;
                    gamma += up * uq;
                }
                if (fabs(gamma) <= 2.220446049250313e-16 * sqrt(alpha * beta))
                    continue;
                rotated = 1;
                double zeta = (beta - alpha) / (2.0 * gamma);
                double t = (zeta >= 0.0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
                double c = 1.0 / sqrt(1.0 + t * t), s = c * t;
                for (int k = 0; k < K; k++) {
                    double up = U[k * K + p], uq = U[k * K + q];
                    U[k * K + p] = c * up - s * uq;
                    U[k * K + q] = s * up + c * uq;
                }
            }
        if (!rotated)
            break;
    }
    double top = 0.0;
    for (int p = 0; p < K; p++) {
        double acc = 0.0;
        for (int k = 0; k < K; k++)
            acc += U[k * K + p] * U[k * K + p];
        if (acc > top)
            top = acc;
    }
    free(U);
    return sqrt(top);
}

/* The learned blocks' map from raw parameters to Q, D and A (kernel_native.py's
   NativeParamMap).  Entry e (five ints: param, offset, target, position, transform) puts
   v = f(theta[param][offset]) into W (target 0) or S (target 1) at position = row * K + col,
   f the identity (0), softplus (1, as torch: x past 20 is x itself) or its square root (2).
   Q = W - W^T unless Qfix is given, D = S S^T unless Dfix is given, A = (Q + D) negP (negP =
   -Sigma_inf^-1); S is written for the backward.  Returns ||A||_2 (sdec_norm2), -1 if out of
   memory. */
INLINE double softplus_value(double x)
{
    return x > 20.0 ? x : log1p(exp(x));
}

INLINE double map_value(int f, double x)
{
    double v = f == 0 ? x : softplus_value(x);
    return f == 2 ? sqrt(v) : v;
}

double sdec_param_map(int K, int m, const int *entries, const double *const *theta,
                      const double *Qfix, const double *Dfix, const double *negP,
                      double *Q, double *D, double *S, double *A)
{
    int KK = K * K;
    double *W = malloc(sizeof(double) * (size_t)(2 * KK > 0 ? 2 * KK : 1));
    if (!W)
        return -1.0;
    double *X = W + KK;
    memset(W, 0, sizeof(double) * (size_t)KK);
    memset(S, 0, sizeof(double) * (size_t)KK);
    for (int e = 0; e < m; e++) {
        const int *E = entries + 5 * e;
        (E[2] ? S : W)[E[3]] = map_value(E[4], theta[E[0]][E[1]]);
    }
    for (int i = 0; i < K; i++)
        for (int j = 0; j < K; j++) {
            Q[i * K + j] = Qfix ? Qfix[i * K + j] : W[i * K + j] - W[j * K + i];
            if (Dfix)
                D[i * K + j] = Dfix[i * K + j];
            else {
                double acc = 0.0;
                for (int k = 0; k < K; k++)
                    acc += S[i * K + k] * S[j * K + k];
                D[i * K + j] = acc;
            }
        }
    for (int i = 0; i < KK; i++)
        X[i] = Q[i] + D[i];
    gemm(K, 0, X, 0, negP, 0.0, A);
    free(W);
    return sdec_norm2(K, A);
}

/* Its adjoint: gtheta (each entry of each parameter written once) from the gradients of Q, D
   and A (any may be NULL: zero), for the S the forward wrote.  With G = gA negP^T: gQ + G
   reaches W as (.) - (.)^T, gD + G reaches S as ((.) + (.)^T) S, and each entry its raw
   parameter through f' (softplus' = e^x / (e^x + 1), 1 past 20; the root's 1 / (2 v)).
   Returns -1 if out of memory. */
int sdec_param_map_backward(int K, int m, const int *entries, const double *const *theta,
                            const double *S, const double *negP, const double *gQ, const double *gD,
                            const double *gA, double *const *gtheta)
{
    int KK = K * K;
    double *G = calloc((size_t)(4 * KK > 0 ? 4 * KK : 1), sizeof(double));
    if (!G)
        return -1;
    double *GQ = G + KK, *GD = G + 2 * KK, *gS = G + 3 * KK;
    if (gA)
        gemm(K, 0, gA, 1, negP, 0.0, G);
    for (int i = 0; i < KK; i++) {
        GQ[i] = (gQ ? gQ[i] : 0.0) + G[i];
        GD[i] = (gD ? gD[i] : 0.0) + G[i];
    }
    for (int i = 0; i < K; i++)
        for (int j = 0; j < K; j++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++)
                acc += (GD[i * K + k] + GD[k * K + i]) * S[k * K + j];
            gS[i * K + j] = acc;
        }
    for (int e = 0; e < m; e++) {
        const int *E = entries + 5 * e;
        int r = E[3] / K, c = E[3] % K;
        double g = E[2] ? gS[E[3]] : GQ[E[3]] - GQ[c * K + r];
        double x = theta[E[0]][E[1]];
        if (E[4] == 2)
            g = g / (2.0 * map_value(2, x));
        if (E[4] != 0 && !(x > 20.0)) {
            double z = exp(x);
            g = g * z / (z + 1.0);
        }
        gtheta[E[0]][E[1]] = g;
    }
    free(G);
    return 0;
}

/* The fused ELBO node's whole backward in one call (kernel_native.NativeElboKernels.backward):
   when x is not NULL (float32 data, f32 = 1), the perturbation y = col x + L eps, score = U eps
   of n examples of N values passes its gradients gy, gs (each NULL: none) to col, L and U first:
   d L = tril(gy eps^T), d U = triu(gs eps^T) and d col = gy x^T per example in float32 (gram_one,
   as sdec_gram_f32), each added in float32 to the incoming gcol, gLb, gU (NULL: zero); then
   sdec_elbo_backward; then, when entries is not NULL (the native map made Q, D and A), the map's
   adjoint (sdec_param_map_backward) into gtheta from gQ and gD.  gA, gQ, gD may then be NULL
   (scratch of its own; else gA and gD zeroed by the caller).  0, or -1 if out of memory. */
int sdec_elbo_backward_node(int K, int nterms, int j, double radius, double anorm, int n,
                            const double *A, const double *D, const double *S0, const double *s,
                            const double *beta, const double *P, const double *Phi, const double *L,
                            const double *Li, double d, int f32, const void *gcol, const void *gLb,
                            const void *gU, const void *gGG, const void *gterms, double *gA, double *gQ,
                            double *gD, const double *keep, long N, const float *x, const float *eps,
                            const float *gy, const float *gs, int m, const int *entries,
                            const double *const *theta, const double *S, const double *negP,
                            double *const *gtheta)
{
    int KK = K * K;
    float *tmp = NULL;
    if (x && f32 && (gy || gs)) {
        tmp = malloc(sizeof(float) * ((size_t)n * (2 * KK + K) + 1));
        if (!tmp)
            return -1;
        float *dL = tmp, *dU = dL + (size_t)n * KK, *dcol = dU + (size_t)n * KK;
        for (int b = 0; b < n; b++) {
            long o = (long)b * K * N;
            if (gy) {
                gram_one(K, K, N, gy + o, eps + o, -1, dL + (size_t)b * KK);
                gram_one(K, 1, N, gy + o, x + (long)b * N, 0, dcol + (size_t)b * K);
            }
            if (gs)
                gram_one(K, K, N, gs + o, eps + o, 1, dU + (size_t)b * KK);
        }
        const float *in[3] = {gcol, gLb, gU};
        float *add[3] = {gy ? dcol : NULL, gy ? dL : NULL, gs ? dU : NULL};
        size_t size[3] = {(size_t)n * K, (size_t)n * KK, (size_t)n * KK};
        for (int q = 0; q < 3; q++)
            if (add[q] && in[q])
                for (size_t e = 0; e < size[q]; e++)
                    add[q][e] = in[q][e] + add[q][e];
        gcol = add[0] ? add[0] : gcol;
        gLb = add[1] ? add[1] : gLb;
        gU = add[2] ? add[2] : gU;
    }
    double *own = NULL;
    if (!gA) {
        own = calloc((size_t)3 * KK + 1, sizeof(double));
        if (!own) {
            free(tmp);
            return -1;
        }
        gA = own;
        gQ = own + KK;
        gD = own + 2 * KK;
    }
    int rc = sdec_elbo_backward(K, nterms, j, radius, anorm, n, A, D, S0, s, beta, P, Phi, L, Li, d, f32,
                                gcol, gLb, gU, gGG, gterms, gA, gQ, gD, keep);
    free(tmp);
    if (rc == 0 && entries)
        rc = sdec_param_map_backward(K, m, entries, theta, S, negP, gQ, gD, NULL, gtheta);
    free(own);
    return rc;
}

/* The fused ELBO node's forward in one call (kernel_native.NativeElboKernels.forward):
   sdec_elbo_forward, then, when x is not NULL (float32, f32 = 1) and every Sigma factored, the
   perturbation y = col x + L eps and its score U eps of the n examples of N values
   (sdec_apply2_f32).  Returns sdec_elbo_forward's code. */
int sdec_elbo_forward_node(int K, int nterms, int j, double radius, double anorm, int n, const double *A,
                           const double *D, const double *S0, const double *s, const double *beta,
                           const double *P, double log_det_inf, double d, int f32, double *Phi,
                           double *Sig, double *L, double *Li, double *hld, int *ok, void *col,
                           void *Lb, void *U, void *GG, void *terms, double *keep, long N,
                           const float *x, const float *eps, float *y, float *score)
{
    int rc = sdec_elbo_forward(K, nterms, j, radius, anorm, n, A, D, S0, s, beta, P, log_det_inf, d, f32,
                               Phi, Sig, L, Li, hld, ok, col, Lb, U, GG, terms, keep);
    if (rc == 0 && x && f32)
        sdec_apply2_f32(n, K, N, Lb, U, col, x, eps, y, score);
    return rc;
}

/* A training step's setup in one call (kernel_base._prepare): the native map's values Q, D, S, A
   and ||A||_2 (sdec_param_map, into *norm), then the importance table's probs and dens at the
   m edges s = B(t) (sdec_rate_table) with the series settings kernel_base derives from ||A||_2:
   radius = tau / ||A||_2 (infinite at 0) and the fewest doublings j with s_T 2^-j <= radius.
   Returns 0; 1 where the caller's own path must run (||A||_2 not finite, or sdec_rate_table's
   1); -1 if out of memory. */
int sdec_elbo_prepare(int K, int me, const int *entries, const double *const *theta, const double *Qfix,
                      const double *Dfix, const double *negP, const double *S0, int nterms, double tau,
                      double s_T, int m, const double *s, const double *widths, double *Q, double *D,
                      double *S, double *A, double *probs, double *dens, double *norm)
{
    double anorm = sdec_param_map(K, me, entries, theta, Qfix, Dfix, negP, Q, D, S, A);
    *norm = anorm;
    if (anorm < 0.0)
        return -1;
    if (!isfinite(anorm))
        return 1;
    double radius = anorm > 0.0 ? tau / anorm : INFINITY, top = s_T / radius;
    int j = 0;
    if (top > 1.0) {
        double up = ceil(log2(top));
        if (!(up < 1e9))
            return 1;
        j = up > 0.0 ? (int)up : 0;
    }
    return sdec_rate_table(K, nterms, j, radius, anorm, m, A, D, S0, s, widths, probs, dens);
}
