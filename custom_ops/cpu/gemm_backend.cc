// oneDNN lookup and the float32 / bfloat16 row-major GEMM (see gemm_backend.h).
#include "gemm_backend.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string_view>
#include <type_traits>

namespace moe_ep {
namespace {

constexpr const char *kOneDnnPathVariable = "MOE_EP_DNNL_LIBRARY";

// oneDNN's row-major C GEMM entry points (dnnl_status_t is an int-sized enum, 0 = success).
using SgemmFunction = int (*)(char transa, char transb, int64_t m, int64_t n, int64_t k,
                              float alpha, const float *a, int64_t lda, const float *b,
                              int64_t ldb, float beta, float *c, int64_t ldc);
using Bf16GemmFunction = int (*)(char transa, char transb, int64_t m, int64_t n, int64_t k,
                                 float alpha, const uint16_t *a, int64_t lda, const uint16_t *b,
                                 int64_t ldb, float beta, float *c, int64_t ldc);

// dnnl_get_effective_cpu_isa: the instruction set oneDNN's kernels use in this process (a
// dnnl_cpu_isa_t), after ONEDNN_MAX_CPU_ISA, the CPU's features and the OS's permission for AMX.
using EffectiveIsaFunction = int (*)();

struct OneDnn {
  SgemmFunction sgemm = nullptr;
  Bf16GemmFunction gemm_bf16 = nullptr;
  EffectiveIsaFunction effective_isa = nullptr;
};

// Finds oneDNN once: first among the libraries already loaded with global symbols, then in the
// library named by MOE_EP_DNNL_LIBRARY (normally already loaded by MindSpore, so cheap).
const OneDnn &LoadedOneDnn() {
  static const OneDnn one_dnn = [] {
    OneDnn found;
    found.sgemm = reinterpret_cast<SgemmFunction>(dlsym(RTLD_DEFAULT, "dnnl_sgemm"));
    found.gemm_bf16 =
        reinterpret_cast<Bf16GemmFunction>(dlsym(RTLD_DEFAULT, "dnnl_gemm_bf16bf16f32"));
    found.effective_isa =
        reinterpret_cast<EffectiveIsaFunction>(dlsym(RTLD_DEFAULT, "dnnl_get_effective_cpu_isa"));
    const char *path = std::getenv(kOneDnnPathVariable);
    if ((found.sgemm == nullptr || found.gemm_bf16 == nullptr) && path != nullptr && *path) {
      if (void *library = dlopen(path, RTLD_NOW | RTLD_LOCAL)) {
        found.sgemm = reinterpret_cast<SgemmFunction>(dlsym(library, "dnnl_sgemm"));
        found.gemm_bf16 =
            reinterpret_cast<Bf16GemmFunction>(dlsym(library, "dnnl_gemm_bf16bf16f32"));
        found.effective_isa = reinterpret_cast<EffectiveIsaFunction>(
            dlsym(library, "dnnl_get_effective_cpu_isa"));
      }
    }
    return found;
  }();
  return one_dnn;
}

// Set through MoeEpSetGemmBackend("reference"), e.g. to test the fallback loop.
std::atomic<bool> reference_gemm_requested{false};

bool UseOneDnn() { return !reference_gemm_requested && LoadedOneDnn().sgemm != nullptr; }

char TransposeFlag(bool transpose) { return transpose ? 'T' : 'N'; }

// The fallback: C[i, j] = sum_p op(A)[i, p] * op(B)[p, j], accumulated in float32.
void ReferenceGemm(const GemmProblem &p, const float *a, const float *b, float *c) {
  for (int64_t i = 0; i < p.m; ++i) {
    float *c_row = c + i * p.ldc;
    std::fill(c_row, c_row + p.n, 0.0f);
    for (int64_t inner = 0; inner < p.k; ++inner) {
      const float a_value = p.trans_a ? a[inner * p.lda + i] : a[i * p.lda + inner];
      for (int64_t j = 0; j < p.n; ++j) {
        const float b_value = p.trans_b ? b[j * p.ldb + inner] : b[inner * p.ldb + j];
        c_row[j] += a_value * b_value;
      }
    }
  }
}

// Sets C [m, n] to zero (the product when the inner dimension k is 0).
template <typename T>
void ZeroMatrix(T *c, int64_t rows, int64_t cols, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) std::fill(c + r * stride, c + r * stride + cols, T{0});
}

void RequireSuccess(int status, const char *function, const GemmProblem &p) {
  if (status != 0) {
    Fail(kInternalError, function, " failed with status ", status, " (m=", p.m, ", n=", p.n,
         ", k=", p.k, ", lda=", p.lda, ", ldb=", p.ldb, ", ldc=", p.ldc, ")");
  }
}

// Columns of C per panel in the converted 16-bit path: B's float32 panel (k x columns) should
// stay in the L2 cache between its conversion and oneDNN's packing of it, but each panel also
// packs op(A) again, so panels are never narrower than 64 columns. Measured (one thread, the
// benchmarks' shapes): 256 KiB to 1 MiB panels run within 4% of each other, 4 MiB ~25% slower.
int64_t PanelColumns(int64_t k) {
  constexpr int64_t kPanelBytes = int64_t{1} << 18;
  constexpr int64_t kMinColumns = 64;
  const int64_t columns = kPanelBytes / (k * static_cast<int64_t>(sizeof(float)));
  return std::max(kMinColumns, columns / 16 * 16);
}

// destination [rows, columns] (dense) = source [rows, columns] (row stride `stride`) as float32.
template <typename T>
void WidenMatrix(const T *source, int64_t rows, int64_t columns, int64_t stride,
                 float *destination) {
  for (int64_t r = 0; r < rows; ++r) {
    const T *in = source + r * stride;
    float *out = destination + r * columns;
    for (int64_t j = 0; j < columns; ++j) out[j] = ToFloat(in[j]);
  }
}

// destination [rows, columns] (row stride `stride`) = source [rows, columns] (dense), rounded.
template <typename T>
void NarrowMatrix(const float *source, int64_t rows, int64_t columns, T *destination,
                  int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *in = source + r * columns;
    T *out = destination + r * stride;
    for (int64_t j = 0; j < columns; ++j) out[j] = FromFloat<T>(in[j]);
  }
}

// C (float32) = op(A) op(B) with oneDNN's bfloat16 GEMM; only when HasFastBFloat16Gemm().
void DirectBFloat16Gemm(const GemmProblem &p, const BFloat16 *a, const BFloat16 *b, float *c) {
  static_assert(sizeof(BFloat16) == sizeof(uint16_t), "BFloat16 must be 16 raw bits");
  const int status = LoadedOneDnn().gemm_bf16(
      TransposeFlag(p.trans_a), TransposeFlag(p.trans_b), p.m, p.n, p.k, 1.0f,
      reinterpret_cast<const uint16_t *>(a), p.lda, reinterpret_cast<const uint16_t *>(b), p.ldb,
      0.0f, c, p.ldc);
  RequireSuccess(status, "dnnl_gemm_bf16bf16f32", p);
}

// The 16-bit Gemm: C is computed in panels of PanelColumns(k) columns into a float32 buffer and
// rounded into c. Unless bfloat16 can be multiplied directly, op(A) is widened once and each
// panel of B before its product.
template <typename T>
void Gemm16(const GemmProblem &p, const T *a, const T *b, T *c) {
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) return ZeroMatrix(c, p.m, p.n, p.ldc);
  bool direct = false;
  if constexpr (std::is_same_v<T, BFloat16>) direct = HasFastBFloat16Gemm();
  const int64_t panel_columns = std::min(p.n, PanelColumns(p.k));
  // A as stored: [m, k], or [k, m] if trans_a.
  const int64_t a_rows = p.trans_a ? p.k : p.m, a_columns = p.trans_a ? p.m : p.k;
  std::unique_ptr<float[]> a_float, b_float;  // not zero-filled
  const std::unique_ptr<float[]> c_float(new float[p.m * panel_columns]);
  if (!direct) {
    a_float.reset(new float[p.m * p.k]);
    WidenMatrix(a, a_rows, a_columns, p.lda, a_float.get());
    b_float.reset(new float[p.k * panel_columns]);
  }
  for (int64_t first = 0; first < p.n; first += panel_columns) {
    GemmProblem panel = p;
    panel.n = std::min(panel_columns, p.n - first);
    panel.ldc = panel.n;
    // The panel of B: columns [first, first + n) of op(B), i.e. rows of B if trans_b.
    const T *b_panel = p.trans_b ? b + first * p.ldb : b + first;
    if (direct) {
      if constexpr (std::is_same_v<T, BFloat16>) {
        DirectBFloat16Gemm(panel, a, b_panel, c_float.get());
      }
    } else {
      panel.lda = a_columns;
      panel.ldb = p.trans_b ? p.k : panel.n;
      WidenMatrix(b_panel, p.trans_b ? panel.n : p.k, p.trans_b ? p.k : panel.n, p.ldb,
                  b_float.get());
      Gemm(panel, a_float.get(), b_float.get(), c_float.get());
    }
    NarrowMatrix(c_float.get(), p.m, panel.n, c + first, p.ldc);
  }
}

}  // namespace

void Gemm(const GemmProblem &p, const float *a, const float *b, float *c) {
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) return ZeroMatrix(c, p.m, p.n, p.ldc);
  if (!UseOneDnn()) return ReferenceGemm(p, a, b, c);
  const int status = LoadedOneDnn().sgemm(TransposeFlag(p.trans_a), TransposeFlag(p.trans_b),
                                          p.m, p.n, p.k, 1.0f, a, p.lda, b, p.ldb, 0.0f, c, p.ldc);
  RequireSuccess(status, "dnnl_sgemm", p);
}

void Gemm(const GemmProblem &p, const BFloat16 *a, const BFloat16 *b, BFloat16 *c) {
  Gemm16(p, a, b, c);
}

void Gemm(const GemmProblem &p, const Float16 *a, const Float16 *b, Float16 *c) {
  Gemm16(p, a, b, c);
}

namespace {

// How bfloat16 products run (MOE_EP_BF16_GEMM, or MoeEpSetBFloat16Gemm).
enum class BFloat16GemmChoice : int { kAuto = 0, kDirect = 1, kConverted = 2 };

int ParseBFloat16GemmChoice(const char *name) {
  const std::string_view text(name ? name : "");
  if (text == "auto") return static_cast<int>(BFloat16GemmChoice::kAuto);
  if (text == "direct") return static_cast<int>(BFloat16GemmChoice::kDirect);
  if (text == "converted") return static_cast<int>(BFloat16GemmChoice::kConverted);
  return -1;
}

std::atomic<int> &BFloat16GemmSetting() {
  static std::atomic<int> setting{[] {
    const char *requested = std::getenv("MOE_EP_BF16_GEMM");
    const int parsed = requested && *requested ? ParseBFloat16GemmChoice(requested) : 0;
    if (parsed < 0) {
      std::fprintf(stderr, "mindspore_moe_ep: MOE_EP_BF16_GEMM=%s is not one of auto, direct, "
                   "converted; using auto\n", requested);
    }
    return std::max(parsed, 0);
  }()};
  return setting;
}

// Whether oneDNN multiplies bfloat16 with AMX in this process: its effective instruction set
// includes avx512_core_amx. dnnl_cpu_isa_t values are masks in which each instruction set has
// the bits of those it extends; avx512_core_amx is 0xfef in the oneDNN that MindSpore 2.10
// ships (0x1fef with AMX-FP16) and was 0x3e7 in older releases, whose bits every AMX value
// carries and no other value does (avx512_core_bf16 0xe7, avx512_core_fp16 0x1ef, ...).
bool OneDnnUsesAmx() {
  constexpr int kAmxBits = 0x3e7;
  const EffectiveIsaFunction effective_isa = LoadedOneDnn().effective_isa;
  return effective_isa != nullptr && (effective_isa() & kAmxBits) == kAmxBits;
}

}  // namespace

bool HasFastBFloat16Gemm() {
  if (!UseOneDnn() || LoadedOneDnn().gemm_bf16 == nullptr) return false;
  switch (static_cast<BFloat16GemmChoice>(BFloat16GemmSetting().load())) {
    case BFloat16GemmChoice::kDirect: return true;
    case BFloat16GemmChoice::kConverted: return false;
    case BFloat16GemmChoice::kAuto: break;
  }
  // Direct only where oneDNN multiplies bfloat16 with AMX: measured there it is ~4x faster than
  // the float32 GEMM, and slower everywhere else (0.2-0.7x with AVX-512 / AVX512-BF16; without
  // AVX-512 oneDNN falls back to a reference loop hundreds of times slower; docs/performance.md,
  // "GEMM backend by CPU"). A rule of the instruction sets rather than a timing: the two paths
  // round differently, so the choice must be the same in every process on a machine. (It used
  // to be timed once per process; under load a launch's ranks then picked either path, and a
  // bfloat16 model's outputs changed from launch to launch: docs/performance.md.)
  return ActiveCpuIsa() >= CpuIsa::kAvx512 && OneDnnUsesAmx();
}

}  // namespace moe_ep

// "onednn" if the grouped matmuls currently use oneDNN, else "reference" (the C++ loop).
MOE_EP_EXPORT const char *MoeEpGemmBackend() {
  return moe_ep::UseOneDnn() ? "onednn" : "reference";
}

// How bfloat16 products run now: "direct" (oneDNN's bfloat16 GEMM) or "converted" (widened to
// float32 panel by panel; also the answer without oneDNN).
MOE_EP_EXPORT const char *MoeEpBFloat16Gemm() {
  return moe_ep::HasFastBFloat16Gemm() ? "direct" : "converted";
}

// Sets how bfloat16 products run: "auto" (the default: the faster on this CPU), "direct" or
// "converted". Returns 0, or 1 for an unknown name.
MOE_EP_EXPORT int MoeEpSetBFloat16Gemm(const char *name) {
  const int parsed = moe_ep::ParseBFloat16GemmChoice(name);
  if (parsed < 0) return 1;
  moe_ep::BFloat16GemmSetting().store(parsed);
  return 0;
}

// Selects the GEMM backend: "onednn" (the default when available) or "reference".
// Returns 0 on success, 1 for an unknown name or if oneDNN was not found.
MOE_EP_EXPORT int MoeEpSetGemmBackend(const char *name) {
  const std::string_view requested(name ? name : "");
  if (requested == "reference") {
    moe_ep::reference_gemm_requested = true;
    return 0;
  }
  if (requested == "onednn" && moe_ep::LoadedOneDnn().sgemm != nullptr) {
    moe_ep::reference_gemm_requested = false;
    return 0;
  }
  return 1;
}
