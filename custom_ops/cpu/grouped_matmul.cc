// Grouped matrix multiplication over rows grouped by expert.
//
//   MoeEpGroupedMatmul             rows [N, K_in], weights [E, K_in, N_out],
//                                  tokens_per_expert [E] int32 -> out [N, N_out]
//   MoeEpGroupedMatmulTransposedB  rows [N, K_in], weights [E, N_out, K_in],
//                                  tokens_per_expert [E] int32 -> out [N, N_out]
//   MoeEpGroupedMatmulWeightGrad   a [N, P], b [N, Q], tokens_per_expert [E] int32
//                                  -> out [E, P, Q], out[e] = a_e^T @ b_e
//
// Group e is the tokens_per_expert[e] consecutive rows after the rows of groups 0..e-1. Only the
// used rows (the first sum(tokens_per_expert)) are read, so rows past them may hold anything
// (the dispatch leaves them unspecified), and the weight gradient sums over the used rows only.
// Output rows past the used rows are unspecified too (not written): the experts' activation is
// the GroupedSwiGLU kernel, which reads only the used rows. (MindSpore's own CPU SiLU would not
// do: it changes the result of every element by up to 1 ulp when any element of the tensor is
// NaN, so it must never see such a tail.)
//
// The work is cut into blocks of output rows that run on KernelThreadCount() threads; every block
// writes its own part of the output. The blocks depend only on the group sizes (not on the thread
// count), so results do not depend on the thread count.
#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm_backend.h"
#include "kernel_common.h"

namespace moe_ep {
namespace {

// The fewest output rows per GEMM call, except for smaller groups. Single-thread oneDNN sgemm
// (AVX2) at the end-to-end benchmark's shapes (k, n = 1024-2048) runs at ~36 GFLOP/s from ~512
// rows per call up, but at 22-34 GFLOP/s with 128-384 rows (weight gradients: ~25), as every
// call packs its operands again. Blocks of 512-1023 rows still leave a thread a share of a
// large group, but fewer blocks than before: with many threads per process, a layer whose groups
// give fewer blocks than threads leaves threads idle (splitting the output columns as well would
// be the fix).
constexpr int64_t kMinRowsPerBlock = 512;

// Where each expert's rows are: group e is rows [offsets[e], offsets[e + 1]).
struct Groups {
  std::vector<int64_t> offsets;  // [E + 1]

  int64_t num_experts() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t start(int64_t expert) const { return offsets[expert]; }
  int64_t size(int64_t expert) const { return offsets[expert + 1] - offsets[expert]; }
  int64_t total_rows() const { return offsets.back(); }
};

// Validates tokens_per_expert [E] against the number of rows and returns the groups.
Groups GroupsOf(const TensorArg &tokens_per_expert, int64_t num_rows) {
  tokens_per_expert.RequireRank(1);
  tokens_per_expert.RequireDtype("int32");
  const int32_t *counts = tokens_per_expert.data_as<const int32_t>();
  Groups groups;
  groups.offsets.assign(tokens_per_expert.dim(0) + 1, 0);
  for (int64_t expert = 0; expert < tokens_per_expert.dim(0); ++expert) {
    if (counts[expert] < 0) {
      Fail(kOutOfRange, "tokens_per_expert[", expert, "] = ", counts[expert], " is negative");
    }
    groups.offsets[expert + 1] = groups.offsets[expert] + counts[expert];
  }
  if (groups.total_rows() > num_rows) {
    Fail(kOutOfRange, "tokens_per_expert sums to ", groups.total_rows(), ", more than the ",
         num_rows, " rows available");
  }
  return groups;
}

// One GEMM call: `count` output rows starting at row `first` of expert `expert`'s output
// (its group of rows for the matmul, its [P, Q] gradient for the weight gradient).
struct Block {
  int64_t expert;
  int64_t first;
  int64_t count;
};

// Splits each expert's `output_rows(expert)` output rows into equal blocks (+-1 row) of
// kMinRowsPerBlock to 2 * kMinRowsPerBlock - 1 rows (fewer for a smaller group).
template <typename OutputRows>
std::vector<Block> MakeBlocks(const Groups &groups, OutputRows &&output_rows) {
  std::vector<Block> blocks;
  for (int64_t expert = 0; expert < groups.num_experts(); ++expert) {
    const int64_t rows_of_expert = output_rows(expert);
    const int64_t count = std::max<int64_t>(1, rows_of_expert / kMinRowsPerBlock);
    for (int64_t index = 0; index < count && rows_of_expert > 0; ++index) {
      const int64_t first = rows_of_expert * index / count;
      const int64_t end = rows_of_expert * (index + 1) / count;
      blocks.push_back(Block{expert, first, end - first});
    }
  }
  return blocks;
}

// Runs gemm_of(block) for every block on the kernel threads.
template <typename GemmOfBlock>
void RunBlocks(const std::vector<Block> &blocks, GemmOfBlock &&gemm_of) {
  ParallelFor(static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) gemm_of(blocks[index]);
  });
}

// out [used rows, N_out] = rows of group e @ W_e, where W_e is weights[e] (or its transpose).
template <typename T>
void GroupedMatmul(const T *rows, int64_t k_in, const T *weights, int64_t n_out,
                   bool transpose_b, const Groups &groups, T *out) {
  const std::vector<Block> blocks =
      MakeBlocks(groups, [&](int64_t expert) { return groups.size(expert); });
  RunBlocks(blocks, [&](const Block &block) {
    const int64_t first_row = groups.start(block.expert) + block.first;
    Gemm(ContiguousGemm(block.count, n_out, k_in, /*trans_a=*/false, transpose_b),
         rows + first_row * k_in, weights + block.expert * k_in * n_out, out + first_row * n_out);
  });
}

// out[e] [P, Q] = a_e^T @ b_e; experts without rows get zeros. Blocks split the P rows of out[e].
template <typename T>
void GroupedWeightGrad(const T *a, int64_t p_size, const T *b, int64_t q_size,
                       const Groups &groups, T *out) {
  const std::vector<Block> blocks =
      MakeBlocks(groups, [&](int64_t /*expert*/) { return p_size; });
  RunBlocks(blocks, [&](const Block &block) {
    const int64_t group_start = groups.start(block.expert);
    GemmProblem problem;
    problem.trans_a = true;
    problem.m = block.count;
    problem.n = q_size;
    problem.k = groups.size(block.expert);
    problem.lda = p_size;
    problem.ldb = q_size;
    problem.ldc = q_size;
    Gemm(problem, a + group_start * p_size + block.first, b + group_start * q_size,
         out + (block.expert * p_size + block.first) * q_size);
  });
}

// The tensors of MoeEpGroupedMatmul(TransposedB) and of MoeEpGroupedMatmulWeightGrad, in
// MindSpore's order (inputs, then outputs).
struct GroupedMatmulArgs {
  static constexpr const char *kNames[] = {"rows", "weights", "tokens_per_expert", "out"};
  TensorArg rows, weights, tokens_per_expert;  // inputs
  TensorArg out;                               // output
};

struct GroupedWeightGradArgs {
  static constexpr const char *kNames[] = {"a", "b", "tokens_per_expert", "out"};
  TensorArg a, b, tokens_per_expert;  // inputs
  TensorArg out;                      // output
};

void RunGroupedMatmul(const GroupedMatmulArgs &args, bool transpose_b) {
  const TensorArg &rows = args.rows, &weights = args.weights;
  const TensorArg &tokens_per_expert = args.tokens_per_expert, &out = args.out;
  rows.RequireRank(2);
  weights.RequireRank(3);
  weights.RequireSameDtype(rows);
  tokens_per_expert.RequireRank(1);
  const int64_t num_rows = rows.dim(0), k_in = rows.dim(1);
  const int64_t num_experts = weights.dim(0);
  weights.RequireDim(transpose_b ? 2 : 1, k_in, "rows.shape[1] (K_in)");
  const int64_t n_out = weights.dim(transpose_b ? 1 : 2);
  tokens_per_expert.RequireDim(0, num_experts, "weights.shape[0] (experts)");
  out.RequireSameDtype(rows);
  out.RequireRank(2);
  out.RequireDim(0, num_rows, "rows.shape[0]");
  out.RequireDim(1, n_out, "N_out of weights");
  const Groups groups = GroupsOf(tokens_per_expert, num_rows);
  const int64_t used_rows = groups.total_rows();

  VisitFloatType(rows, [&](auto element) {
    using T = decltype(element);
    // Only the used rows are computed; the tail is not written.
    GroupedMatmul(rows.data_as<const T>(), k_in, weights.data_as<const T>(), n_out, transpose_b,
                  groups, out.data_as<T>());
    if (PoisonUnusedRows()) {
      FillWithNaN(out.data_as<T>() + used_rows * n_out, (num_rows - used_rows) * n_out);
    }
  });
}

void RunGroupedWeightGrad(const GroupedWeightGradArgs &args) {
  const TensorArg &a = args.a, &b = args.b, &tokens_per_expert = args.tokens_per_expert;
  const TensorArg &out = args.out;
  a.RequireRank(2);
  b.RequireRank(2);
  b.RequireSameDtype(a);
  b.RequireDim(0, a.dim(0), "a.shape[0] (rows)");
  tokens_per_expert.RequireRank(1);
  const int64_t num_experts = tokens_per_expert.dim(0);
  out.RequireSameDtype(a);
  out.RequireRank(3);
  out.RequireDim(0, num_experts, "tokens_per_expert.shape[0] (experts)");
  out.RequireDim(1, a.dim(1), "a.shape[1]");
  out.RequireDim(2, b.dim(1), "b.shape[1]");
  const Groups groups = GroupsOf(tokens_per_expert, a.dim(0));

  VisitFloatType(a, [&](auto element) {
    using T = decltype(element);
    // Sums over the used rows only: the rows past them may hold anything, even NaN.
    GroupedWeightGrad(a.data_as<const T>(), a.dim(1), b.data_as<const T>(), b.dim(1), groups,
                      out.data_as<T>());
  });
}

}  // namespace
}  // namespace moe_ep

using moe_ep::BindArgsAs;
using moe_ep::RunKernel;

MOE_EP_EXPORT int MoeEpGroupedMatmul(int nparam, void **params, int *ndims, int64_t **shapes,
                                     const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return RunKernel("MoeEpGroupedMatmul", [&] {
    moe_ep::RunGroupedMatmul(
        BindArgsAs<moe_ep::GroupedMatmulArgs>(nparam, params, ndims, shapes, dtypes),
        /*transpose_b=*/false);
  });
}

MOE_EP_EXPORT int MoeEpGroupedMatmulTransposedB(int nparam, void **params, int *ndims,
                                                int64_t **shapes, const char **dtypes,
                                                void * /*stream*/, void * /*extra*/) {
  return RunKernel("MoeEpGroupedMatmulTransposedB", [&] {
    moe_ep::RunGroupedMatmul(
        BindArgsAs<moe_ep::GroupedMatmulArgs>(nparam, params, ndims, shapes, dtypes),
        /*transpose_b=*/true);
  });
}

MOE_EP_EXPORT int MoeEpGroupedMatmulWeightGrad(int nparam, void **params, int *ndims,
                                               int64_t **shapes, const char **dtypes,
                                               void * /*stream*/, void * /*extra*/) {
  return RunKernel("MoeEpGroupedMatmulWeightGrad", [&] {
    moe_ep::RunGroupedWeightGrad(
        BindArgsAs<moe_ep::GroupedWeightGradArgs>(nparam, params, ndims, shapes, dtypes));
  });
}
