"""A hand-written int8 weight-only GEMV for CPU decoding: `torch.ops.lmforge.int8_gemv`.

    y[m, n] = scale[n] * sum_k x[m, k] * (u[n, k] - 128)        x: (M, K) float32, M small (decode)
                                                               u: (N, >=K) uint8, scale: (N,) float32

`u` is the int8 per-channel layer exactly as stored on disk (compressed-tensors "pack-quantized",
8 bits: value + 128 in each byte of the int32 words, see quantized.py), viewed as bytes: the kernel
reads the stored tensor, so the layer holds 1 byte per weight and nothing else. Accumulation is in
fp32 (the int8 -> fp32 conversion is exact), so results agree with the dequantize-then-matmul path
to fp32 rounding.

Why it exists: decoding one token multiplies one row by every weight matrix, so the cost is
streaming the weights from memory, and int8 weights are a quarter of fp32's bytes. The library
kernels do not deliver that on this AVX2 CPU: `torch._weight_int8pack_mm` (torchao's int8 weight-only
CPU path) measured ~14x slower than the fp32 GEMV on a 2816x1024 matrix, and eager dequantize-per-step
0.31x of fp32 decode (benchmarks/RESULTS.md, Quantization). The kernel: AVX2 + FMA, 32 weights per
iteration (load and widen bytes to int32, convert to fp32, fused multiply-add; the +128 offset is
subtracted once per row through the sum of x), two input rows share each widened weight vector,
output rows split across threads with `at::parallel_for`.

It is registered as a torch custom op in C++ (TORCH_LIBRARY), with a fake (meta) implementation
registered here, so `torch.compile(fullgraph=True)` (the engine's compiled decode step) calls it
without a graph break and inductor's C++ wrapper calls it with no Python hop.

Built once with `torch.utils.cpp_extension.load_inline` (needs g++ and ninja) into
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), on first use. Where it cannot be built or
run (no compiler, not x86-64 with AVX2 + FMA, or LMFORGE_INT8_KERNEL=0), `available()` is False, a
warning says why once, and QuantizedLinear keeps its dequantize path.
"""

from __future__ import annotations

import os
import platform
import shutil
import threading
import warnings

import torch

MAX_ROWS = 8  # the kernel serves inputs of up to this many rows (decode); larger ones dequantize

_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// 8 stored bytes at p (value + 128) -> 8 floats (value + 128): one load-and-widen, one convert
inline __m256 load8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// One output row n: y[m, n] for input rows m in [0, M). The bytes hold value + 128, so
// sum_k x[k] * value[k] = sum_k x[k] * byte[k] - 128 * sum_k x[k]   (xsum128[m] = 128 * sum_k x[m, k]).
// Accumulators are named variables (an array of them is kept on the stack by g++, which puts a
// store/load on every add's dependency chain: 3-4x slower).
inline void one_output(const float* x, const float* xsum128, int64_t M, const uint8_t* wr, float scale,
                       float* y, int64_t ldy, int64_t K) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {  // two input rows share each widened weight vector
    const float* xa = x + m * K;
    const float* xb = xa + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m256 w0 = load8(wr + k), w1 = load8(wr + k + 8);
      a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xa + k), a0);
      a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xa + k + 8), a1);
      b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb + k), b0);
      b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + k + 8), b1);
    }
    for (; k + 8 <= K; k += 8) {
      __m256 w0 = load8(wr + k);
      a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xa + k), a0);
      b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb + k), b0);
    }
    float sa = hsum(_mm256_add_ps(a0, a1)), sb = hsum(_mm256_add_ps(b0, b1));
    for (; k < K; ++k) {
      sa += xa[k] * (float)wr[k];
      sb += xb[k] * (float)wr[k];
    }
    y[m * ldy] = (sa - xsum128[m]) * scale;
    y[(m + 1) * ldy] = (sb - xsum128[m + 1]) * scale;
  }
  if (m < M) {  // one input row: four independent accumulators
    const float* xa = x + m * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      a0 = _mm256_fmadd_ps(load8(wr + k), _mm256_loadu_ps(xa + k), a0);
      a1 = _mm256_fmadd_ps(load8(wr + k + 8), _mm256_loadu_ps(xa + k + 8), a1);
      a2 = _mm256_fmadd_ps(load8(wr + k + 16), _mm256_loadu_ps(xa + k + 16), a2);
      a3 = _mm256_fmadd_ps(load8(wr + k + 24), _mm256_loadu_ps(xa + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(wr + k), _mm256_loadu_ps(xa + k), a0);
    float sa = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) sa += xa[k] * (float)wr[k];
    y[m * ldy] = (sa - xsum128[m]) * scale;
  }
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && scale.dim() == 1,
              "int8_gemv: x (M, K), w (N, Kp), scale (N,)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat,
              "int8_gemv: float32 x, scale");
  TORCH_CHECK(w.scalar_type() == at::kByte, "int8_gemv: w must be uint8 (value + 128)");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(),
              "int8_gemv: CPU tensors");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) >= K && scale.size(0) == N, "int8_gemv: shapes do not match");
  TORCH_CHECK(w.stride(1) == 1 && scale.is_contiguous(), "int8_gemv: w rows and scale must be contiguous");
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  std::vector<float> xsum128(M);
  for (int64_t m = 0; m < M; ++m) {
    double t = 0;
    for (int64_t k = 0; k < K; ++k) t += xp[m * K + k];
    xsum128[m] = (float)(128.0 * t);
  }
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldw = w.stride(0);
  const int64_t grain = std::max<int64_t>(16, (int64_t)(1 << 16) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) one_output(xp, xsum128.data(), M, wp + n * ldw, sp[n], yp + n, N, K);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(lmforge, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
}
"""

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "why": str (set once)


def _cpu_supported() -> str | None:
    """None if this CPU can run the kernel, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 + FMA (torch reports {capability})"
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        return "no C++ compiler (g++) on PATH"
    return None


def _build() -> None:
    if _state.get("built"):
        return
    from torch.utils.cpp_extension import load_inline

    load_inline(
        name="lmforge_int8_gemv_v3",
        cpp_sources=[_CPP],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-std=c++17"],
        is_python_module=False,
        verbose=False,
    )

    @torch.library.register_fake("lmforge::int8_gemv")
    def _(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        torch._check(x.dim() == 2 and w.dim() == 2)
        return x.new_empty((x.shape[0], w.shape[0]))

    _state["built"] = True


def available() -> bool:
    """Whether `torch.ops.lmforge.int8_gemv` can be used here (builds it on the first call; warns
    once, with the reason, when it cannot)."""
    state = _state.get("ok")
    if state is not None:
        return bool(state)
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        why = None
        if os.environ.get("LMFORGE_INT8_KERNEL", "1") == "0":
            why = "LMFORGE_INT8_KERNEL=0"
        else:
            why = _cpu_supported()
        if why is None:
            try:
                _build()
            except Exception as err:  # a compiler or toolchain failure: fall back, loudly
                why = f"building the C++ kernel failed: {type(err).__name__}: {str(err).strip()[:300]}"
        if why is not None:
            warnings.warn(
                f"lmforge int8 GEMV kernel unavailable ({why}); int8 layers dequantize on every call "
                "instead (correct, slower decoding)",
                RuntimeWarning,
                stacklevel=2,
            )
        _state["why"] = why or ""
        _state["ok"] = why is None
        return why is None


def decided_available() -> bool:
    """True only if `available()` already ran here and found the kernel usable (never builds)."""
    return _state.get("ok") is True


def unavailable_reason() -> str | None:
    """Why the kernel is not used (None if it is); builds/checks it first."""
    return None if available() else str(_state.get("why"))


def int8_gemv(x: torch.Tensor, w_bytes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, K) float32 x (N, >=K) uint8 (value + 128), scale (N,) float32 -> (M, N) float32."""
    return torch.ops.lmforge.int8_gemv(x, w_bytes, scale)


def _reset_for_tests(ok: bool | None = None, why: str = "") -> None:
    """Forget (or force) the availability decision; tests use it to exercise the fallback."""
    with _lock:
        built = _state.get("built")
        _state.clear()
        if built:
            _state["built"] = True
        if ok is not None:
            _state["ok"], _state["why"] = ok, why
