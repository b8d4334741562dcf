"""A compiled kernel for the LSTM optimizer's gate arithmetic on CPUs (optional, with an eager fallback).

After the two matrix products of a layer, the cell's elementwise work (four sigmoids,
the cell update, ``tanh``, the output gate) is, in eager PyTorch, a dozen passes over
``[4 hidden, N]`` matrices, each paying a full trip through memory; its backward a
dozen more. Here each is one pass of a small C loop, compiled at first use with the
system's C compiler (about a second) into a cache directory (``$L2O_KERNEL_CACHE``,
default ``~/.cache/l2o``) and called through :mod:`ctypes` on the tensors' storage, so
it needs no PyTorch headers. ``exp`` for float32 is Cephes' ``expf`` (a degree-6
polynomial after range reduction, within 2 ulp), which the compiler vectorises; float64
uses the C library's ``exp``.

Where no compiler is found or the build fails, :func:`kernel` returns ``None`` after a
single warning and callers use their eager PyTorch code. ``L2O_NO_KERNEL=1`` disables it.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
import weakref

import torch

_EXP_F32 = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float exp_f32(float x) {  /* Cephes expf; NaN stays NaN */
    x = x > 88.0f ? 88.0f : x;  /* 2^n below stays a normal float: n <= 127 */
    x = x < -87.0f ? -87.0f : x;
    float fx = floorf(x * 1.44269504088896341f + 0.5f);
    x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.0f;
    int32_t e = ((int32_t)fx + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return y * scale;
}
static inline double exp_f64(double x) { return exp(x); }

static inline float log_f32(float x) {  /* Cephes logf for x > 0; NaN and inf pass through */
    int32_t ix;
    memcpy(&ix, &x, sizeof ix);
    float fe = (float)(((ix >> 23) & 0xff) - 126);  /* x = m 2^e, m in [0.5, 1) */
    ix = (ix & 0x007fffff) | 0x3f000000;
    float m;
    memcpy(&m, &ix, sizeof m);
    if (m < 0.70710678118654752f) { m = m + m - 1.0f; fe -= 1.0f; } else { m = m - 1.0f; }
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z - 2.12194440e-4f * fe - 0.5f * z;
    float r = m + y + 0.693359375f * fe;
    return x < INFINITY ? r : x;  /* a select, not a branch: the loop stays vectorisable */
}
static inline double log_f64(double x) { return log(x); }
"""

_GATES = r"""
/* Everything coordinate-major: row n of pre / s / dpre [N, 4H] holds the i, f, o, q gates of
   coordinate n, rows of the states [N, H] are H apart. */
#define ROWS(n) \
    const int64_t g0 = (n) * 4 * H, r0 = (n) * H;
/* pointers to the four gate blocks of row g0 of base: NAMEi, NAMEf, NAMEo, NAMEq */
#define GATES(Q, NAME, base) \
    Q T *restrict NAME##i = (base) + g0, *restrict NAME##f = NAME##i + H, \
        *restrict NAME##o = NAME##i + 2 * H, *restrict NAME##q = NAME##i + 3 * H;

/* With a graph: pre holds the gate products (the bias b [4H] still to add) and gets the
   sigmoids; c [N, H] in; c_new, t = tanh(c_new), h_new out. */
void gates_fwd_SFX(T *restrict pre, const T *restrict b, const T *restrict c, T *restrict c_new, T *restrict t,
                   T *restrict h_new, int64_t H, int64_t N) {
    for (int64_t n = 0; n < N; ++n) {
        ROWS(n)
        GATES(, p, pre)
        for (int64_t j = 0; j < H; ++j) {
            T i = (T)1 / ((T)1 + EXP(-(pi[j] + b[j])));
            T f = (T)1 / ((T)1 + EXP(-(pf[j] + b[H + j])));
            T o = (T)1 / ((T)1 + EXP(-(po[j] + b[2 * H + j])));
            T q = (T)1 / ((T)1 + EXP(-(pq[j] + b[3 * H + j])));
            pi[j] = i;
            pf[j] = f;
            po[j] = o;
            pq[j] = q;
            T cc = f * c[r0 + j] + i * ((T)2 * q - (T)1);
            T th = (T)2 / ((T)1 + EXP((T)-2 * cc)) - (T)1;
            c_new[r0 + j] = cc;
            t[r0 + j] = th;
            h_new[r0 + j] = o * th;
        }
    }
}

/* One hidden unit without a graph from its four gate pre-activations (bias included): the cell
   state *c is read, then overwritten; *h gets o tanh(c'). */
static inline void unit_SFX(T ai, T af, T ao, T aq, T *restrict c, T *restrict h) {
    T i = (T)1 / ((T)1 + EXP(-ai));
    T f = (T)1 / ((T)1 + EXP(-af));
    T o = (T)1 / ((T)1 + EXP(-ao));
    T q = (T)1 / ((T)1 + EXP(-aq));
    T cc = f * *c + i * ((T)2 * q - (T)1);
    *c = cc;
    *h = o * ((T)2 / ((T)1 + EXP((T)-2 * cc)) - (T)1);
}

/* Without a graph: the same from pre (unchanged); c [N, H] updated in place (each element
   read, then written, by the same iteration), h [N, H] out. */
void gates_fwd_cm_SFX(const T *restrict pre, const T *restrict b, T *restrict c, T *restrict h,
                      int64_t H, int64_t N) {
    for (int64_t n = 0; n < N; ++n) {
        ROWS(n)
        GATES(const, p, pre)
        for (int64_t j = 0; j < H; ++j)
            unit_SFX(pi[j] + b[j], pf[j] + b[H + j], po[j] + b[2 * H + j], pq[j] + b[3 * H + j], c + r0 + j,
                     h + r0 + j);
    }
}

/* A layer without a graph, its products and gates in one pass per coordinate, so the [N, 4H]
   pre-activations never go through memory: for coordinate n, [inp_n, h_n] W^T + b is accumulated
   in ten vector registers per block of ten vectors of outputs (the GCC/Clang vector extension,
   32-byte vectors), each input element broadcast once per block, then written to the row buffer
   acc [P] that the gate loop reads from L1. wt [F + H, P] is W^T with its 4H columns zero-padded
   to P, a multiple of ten vectors, bp [P] the padded bias; element (n, k) of inp is inp[n sn + k sk]
   (the features' [N, F] view of [F, N] storage is read in place). c [N, H] is updated in place; h_out
   [N, H] may be h itself (row n of h is read completely before row n of h_out is written). */
typedef T vec_SFX __attribute__((vector_size(32), aligned(sizeof(T)), may_alias));
#define V_SFX(p, u) (*(const vec_SFX *)((p) + (u) * (int64_t)(sizeof(vec_SFX) / sizeof(T))))
#define ACC_SFX(OP, s, w) OP(0, s, w) OP(1, s, w) OP(2, s, w) OP(3, s, w) OP(4, s, w) \
    OP(5, s, w) OP(6, s, w) OP(7, s, w) OP(8, s, w) OP(9, s, w)
#define FMA_SFX(u, s, w) a##u += (s) * V_SFX(w, u);
#define LOAD_SFX(u, s, w) vec_SFX a##u = V_SFX(w, u);
#define STORE_SFX(u, s, w) *(vec_SFX *)((w) + (u) * (int64_t)(sizeof(vec_SFX) / sizeof(T))) = a##u;
void layer_cm_SFX(const T *restrict inp, int64_t sn, int64_t sk, int64_t F, const T *h, const T *restrict wt,
                  const T *restrict bp, T *restrict c, T *h_out, T *restrict acc, int64_t H, int64_t P, int64_t N) {
    /* ten named accumulators (not an array: the compiler keeps them in registers) */
    for (int64_t n = 0; n < N; ++n) {
        const T *xr = inp + n * sn, *hr = h + n * H;
        for (int64_t o0 = 0; o0 < P; o0 += 10 * (int64_t)(sizeof(vec_SFX) / sizeof(T))) {
            ACC_SFX(LOAD_SFX, 0, bp + o0)
            for (int64_t k = 0; k < F; ++k) {
                ACC_SFX(FMA_SFX, xr[k * sk], wt + k * P + o0)
            }
            for (int64_t k = 0; k < H; ++k) {
                ACC_SFX(FMA_SFX, hr[k], wt + (F + k) * P + o0)
            }
            ACC_SFX(STORE_SFX, 0, acc + o0)
        }
        for (int64_t j = 0; j < H; ++j)
            unit_SFX(acc[j], acc[H + j], acc[2 * H + j], acc[3 * H + j], c + n * H + j, h_out + n * H + j);
    }
}
#undef V_SFX
#undef ACC_SFX
#undef FMA_SFX
#undef LOAD_SFX
#undef STORE_SFX

/* s [N, 4H] sigmoids, t [N, H], c [N, H] the previous cell state, dh and dc [N, H] the incoming
   gradients; out: dpre [N, 4H] (gradient of the pre-activations), dc_prev [N, H]. */
void gates_bwd_SFX(const T *restrict s, const T *restrict t, const T *restrict c, const T *restrict dh,
                   const T *restrict dc, T *restrict dpre, T *restrict dc_prev, int64_t H, int64_t N) {
    for (int64_t n = 0; n < N; ++n) {
        ROWS(n)
        GATES(const, s, s)
        GATES(, d_, dpre)
        for (int64_t j = 0; j < H; ++j) {
            T i = si[j], f = sf[j], o = so[j], q = sq[j], th = t[r0 + j], g = dh[r0 + j];
            T dcv = dc[r0 + j] + g * o * ((T)1 - th * th);
            d_i[j] = dcv * ((T)2 * q - (T)1) * i * ((T)1 - i);
            d_f[j] = dcv * c[r0 + j] * f * ((T)1 - f);
            d_o[j] = g * th * o * ((T)1 - o);
            d_q[j] = (T)2 * dcv * i * q * ((T)1 - q);
            dc_prev[r0 + j] = dcv * f;
        }
    }
}
#undef GATES
#undef ROWS
"""

_RICH = r"""
/* The "rich" input features without a graph (l2o.optim.preprocess.rich), one pass:
   g [N]; m [3, N], v [N] the moment EMAs in, m_out, v_out out; x [7, N] the features out;
   k = (d0, d1, d2, 1 - d0, 1 - d1, 1 - d2, 1 - d0^t, 1 - d1^t, 1 - d2^t, R, 1 - R, 1 - R^t, p,
   e^-p, e^p, eps^2), each rounded as the eager code rounds it. */
void rich_SFX(const T *restrict g, const T *restrict m, const T *restrict v, T *restrict m_out,
              T *restrict v_out, T *restrict x, const T *restrict k, int64_t N) {
    const T d0 = k[0], d1 = k[1], d2 = k[2], e0 = k[3], e1 = k[4], e2 = k[5], b0 = k[6], b1 = k[7], b2 = k[8];
    const T R = k[9], eR = k[10], bv = k[11], p = k[12], lo = k[13], hi = k[14], eps2 = k[15];
    /* three short loops: one loop with every stream was not vectorised by the compiler */
    for (int64_t n = 0; n < N; ++n) {  /* the moments */
        T gn = g[n];
        m_out[n] = d0 * m[n] + e0 * gn;
        m_out[N + n] = d1 * m[N + n] + e1 * gn;
        m_out[2 * N + n] = d2 * m[2 * N + n] + e2 * gn;
        v_out[n] = R * v[n] + eR * gn * gn;
    }
    for (int64_t n = 0; n < N; ++n) {  /* log / sign of g (the L2L paper's features) */
        T gn = g[n], a = gn < 0 ? -gn : gn;
        T lg = LOG(a > lo ? a : lo) / p;
        T sg = (T)(gn > 0) - (T)(gn < 0);
        x[n] = a >= lo ? lg : (T)-1;
        x[N + n] = a >= lo ? sg : gn * hi;
    }
    for (int64_t n = 0; n < N; ++n) {  /* momenta and g over the RMS of g, log RMS */
        T rms = SQRT(v_out[n] / bv + eps2);
        x[2 * N + n] = (m_out[n] / b0) / rms;
        x[3 * N + n] = (m_out[N + n] / b1) / rms;
        x[4 * N + n] = (m_out[2 * N + n] / b2) / rms;
        x[5 * N + n] = g[n] / rms;
        x[6 * N + n] = LOG(rms) / p;
    }
}
"""

SOURCE = _EXP_F32 + "".join(
    (_GATES + _RICH).replace("SFX", sfx).replace("EXP", f"exp_{sfx}").replace("LOG", f"log_{sfx}")
    .replace("SQRT", sqrt).replace("T ", f"{ct} ").replace("(T)", f"({ct})")
    for sfx, ct, sqrt in (("f32", "float", "sqrtf"), ("f64", "double", "sqrt")))

_FLAGS = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math"]
_state: dict = {}


def _arch_flags() -> list[str]:
    # the vector width the running CPU has, as PyTorch detected it (no -march=native:
    # a cached library may be read by another machine sharing the home directory)
    cap = torch.backends.cpu.get_cpu_capability()
    return ["-mavx2", "-mfma"] if cap in ("AVX2", "AVX512") else []


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    flags = _FLAGS + _arch_flags()
    key = hashlib.sha256((SOURCE + " ".join(flags) + cc).encode()).hexdigest()[:16]
    root = os.environ.get("L2O_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "l2o")
    path = os.path.join(root, f"lstm_kernel_{key}.so")
    if not os.path.exists(path):
        os.makedirs(root, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            src, out = os.path.join(tmp, "k.c"), os.path.join(tmp, "k.so")
            with open(src, "w") as fh:
                fh.write(SOURCE)
            res = subprocess.run([cc, *flags, src, "-o", out, "-lm"], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-500:]}")
            os.replace(out, path)  # atomic: concurrent processes never load a half-written file
    lib = ctypes.CDLL(path)
    for sfx in ("f32", "f64"):
        getattr(lib, f"gates_fwd_{sfx}").argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2
        getattr(lib, f"gates_bwd_{sfx}").argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 2
        getattr(lib, f"gates_fwd_cm_{sfx}").argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
        getattr(lib, f"layer_cm_{sfx}").argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 6
                                                    + [ctypes.c_int64] * 3)
        getattr(lib, f"rich_{sfx}").argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64]
    return lib


def kernel() -> ctypes.CDLL | None:
    """The compiled library (built on first call), or None where it cannot be had."""
    if "lib" not in _state:
        if os.environ.get("L2O_NO_KERNEL"):
            _state["lib"] = None
        else:
            try:
                _state["lib"] = _build()
            except Exception as exc:  # no compiler, read-only home, exotic platform
                warnings.warn(f"l2o: the compiled LSTM kernel is unavailable ({exc}); using eager PyTorch "
                              f"operations (slower)", RuntimeWarning, stacklevel=3)
                _state["lib"] = None
    return _state["lib"]


def usable(*tensors: torch.Tensor) -> bool:
    """True if the kernel applies: CPU, float32/float64, contiguous, no autograd recording needed."""
    t0 = tensors[0]
    return (not _state.get("off") and t0.device.type == "cpu" and t0.dtype in (torch.float32, torch.float64)
            and all(t.is_contiguous() and t.dtype == t0.dtype for t in tensors) and kernel() is not None)


@contextlib.contextmanager
def disabled():
    """Within this block the eager PyTorch operations run instead (tests, side-by-side benchmarks)."""
    old = _state.get("off", False)
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = old


def _p(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _sfx(*tensors: torch.Tensor | None) -> str:
    ts = [t for t in tensors if t is not None]
    if not all(t.dtype == ts[0].dtype and t.is_contiguous() and t.device.type == "cpu" for t in ts):
        raise ValueError("the LSTM kernel needs contiguous CPU tensors of one dtype")
    return "f32" if ts[0].dtype == torch.float32 else "f64"


def gates_forward(pre: torch.Tensor, b: torch.Tensor, c: torch.Tensor, c_new: torch.Tensor, t: torch.Tensor,
                  h_new: torch.Tensor) -> None:
    """In place: ``pre`` [N, 4H] (products; bias ``b`` [4H] added here) becomes the gate sigmoids;
    writes ``c_new``, ``t = tanh(c_new)``, ``h_new`` [N, H]."""
    N, H = c.shape
    getattr(kernel(), f"gates_fwd_{_sfx(pre, b, c, c_new, t, h_new)}")(_p(pre), _p(b), _p(c), _p(c_new), _p(t),
                                                                      _p(h_new), H, N)


def gates_forward_cm(pre: torch.Tensor, b: torch.Tensor, c: torch.Tensor, h: torch.Tensor) -> None:
    """Coordinate-major, no graph: from ``pre + b`` ([N, 4H] + [4H]), updates ``c`` [N, H] in place, writes ``h``."""
    N, H = c.shape
    getattr(kernel(), f"gates_fwd_cm_{_sfx(pre, b, c, h)}")(_p(pre), _p(b), _p(c), _p(h), H, N)


# weight -> (what it was packed from, W^T padded, bias padded): the no-graph step packs each
# layer's weights once and reuses them while they are unchanged (evaluation, the adapter)
# (keyed by id, dropped when the weight is freed: tensors compare elementwise, so no WeakKeyDictionary)
_PACKED: dict[int, tuple] = {}


def _packed(w: torch.Tensor, b: torch.Tensor, F: int, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``W^T`` [F + H, P] and ``b`` [P], zero-padded to whole register blocks of ten 32-byte vectors;
    rebuilt when either tensor is changed in place (its version counter) or replaced."""
    key = (w.data_ptr(), w._version, b.data_ptr(), b._version, w.dtype)
    hit = _PACKED.get(id(w))
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    if hit is None:
        weakref.finalize(w, _PACKED.pop, id(w), None)
    block = 10 * (32 // w.element_size())
    P = -(-4 * H // block) * block
    with torch.no_grad():
        wt = w.new_zeros(F + H, P)
        wt[:, :4 * H] = w.t()
        bp = b.new_zeros(P)
        bp[:4 * H] = b
    _PACKED[id(w)] = (key, wt, bp)
    return wt, bp


def layer_forward_cm(inp: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                     h_out: torch.Tensor) -> None:
    """One layer without a graph, products and gates in one pass: ``c`` [N, H] updated in place,
    ``h_out`` [N, H] written (it may be ``h``); ``inp`` [N, F] of any strides, ``w`` [4H, F + H], ``b`` [4H]."""
    N, H = c.shape
    F = inp.shape[1]
    if inp.dtype != h.dtype or inp.device.type != "cpu":
        raise ValueError("the LSTM kernel needs CPU tensors of one dtype")
    if inp.shape[0] != N or h.shape != c.shape or h_out.shape != c.shape or w.shape != (4 * H, F + H):
        raise ValueError(f"the LSTM kernel got inputs of {tuple(inp.shape)}, states of {tuple(h.shape)}, "
                         f"{tuple(c.shape)}, {tuple(h_out.shape)} and weights of {tuple(w.shape)}")
    wt, bp = _packed(w, b, F, H)
    acc = b.new_empty(wt.shape[1])
    getattr(kernel(), f"layer_cm_{_sfx(h, wt, bp, c, h_out, acc)}")(
        _p(inp), inp.stride(0), inp.stride(1), F, _p(h), _p(wt), _p(bp), _p(c), _p(h_out), _p(acc), H, wt.shape[1], N)


def gates_backward(s: torch.Tensor, t: torch.Tensor, c: torch.Tensor, dh: torch.Tensor | None,
                   dc: torch.Tensor | None, dpre: torch.Tensor, dc_prev: torch.Tensor) -> None:
    """Writes ``dpre`` [N, 4H] (gradient of the gate pre-activations) and ``dc_prev`` [N, H]; None is zero."""
    N, H = c.shape
    zero = torch.zeros_like(c) if dh is None or dc is None else None
    dh, dc = zero if dh is None else dh, zero if dc is None else dc
    getattr(kernel(), f"gates_bwd_{_sfx(s, t, c, dh, dc, dpre, dc_prev)}")(_p(s), _p(t), _p(c), _p(dh), _p(dc), _p(dpre), _p(dc_prev), H, N)


def rich(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, k: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`l2o.optim.preprocess.rich` in one pass: ``([7, N] features, new m [3, N], new v [N])``."""
    x, m_out, v_out = g.new_empty(7, g.shape[0]), torch.empty_like(m), torch.empty_like(v)
    getattr(kernel(), f"rich_{_sfx(g, m, v, k)}")(_p(g), _p(m), _p(v), _p(m_out), _p(v_out), _p(x), _p(k), g.shape[0])
    return x, m_out, v_out
