// Replica selection (mindspore_moe_ep/load_balancing/replica_selection.py): the physical expert
// slot of every (token, expert) pair of this rank, from its candidate table.
//
//   expert_ids [T, K] int32 (logical experts), candidates [E, R] int32 (row e: expert e's
//   candidate slots, repeated to fill the row), candidate_counts [E] int32 (in [1, R]),
//   rank [1] int32 (this rank's index in the group)
//   -> slot_ids [T, K] int32: candidates[e, (t + rank) mod candidate_counts[e]] for e =
//      expert_ids[t, k]
//
// One kernel instead of five element-wise MindSpore ops (gather, arange, add, mod, gather_nd):
// the selection runs before every dispatch, so its launch cost is paid in every decode step.
#include "kernel_common.h"

namespace moe_ep {
namespace {

struct SelectReplicasArgs {
  static constexpr const char *kNames[] = {"expert_ids", "candidates", "candidate_counts", "rank",
                                           "slot_ids"};
  TensorArg expert_ids, candidates, candidate_counts, rank;  // inputs
  TensorArg slot_ids;                                         // output
};

void SelectReplicas(const SelectReplicasArgs &args) {
  args.expert_ids.RequireRank(2);
  args.expert_ids.RequireDtype("int32");
  args.candidates.RequireRank(2);
  args.candidates.RequireDtype("int32");
  args.candidate_counts.RequireRank(1);
  args.candidate_counts.RequireDtype("int32");
  const int64_t experts = args.candidates.dim(0), width = args.candidates.dim(1);
  args.candidate_counts.RequireDim(0, experts, "the candidate table's experts");
  const int64_t tokens = args.expert_ids.dim(0), top_k = args.expert_ids.dim(1);
  args.slot_ids.RequireDim(0, tokens, "the number of tokens");
  args.slot_ids.RequireDim(1, top_k, "top_k");
  const int64_t rank = ScalarInput(args.rank);
  const int32_t *ids = args.expert_ids.data_as<const int32_t>();
  const int32_t *candidates = args.candidates.data_as<const int32_t>();
  const int32_t *counts = args.candidate_counts.data_as<const int32_t>();
  for (int64_t e = 0; e < experts; ++e) {
    if (counts[e] < 1 || counts[e] > width) {
      Fail(kOutOfRange, "candidate_counts[", e, "] = ", counts[e], " is outside [1, ", width,
           "]");
    }
  }
  int32_t *slots = args.slot_ids.data_as<int32_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t index = t * top_k + k;
      const int32_t expert = ids[index];
      if (expert < 0 || expert >= experts) {
        Fail(kOutOfRange, "expert_ids", args.expert_ids.IndexString(index), " = ", expert,
             " is out of range [0, ", experts, ")");
      }
      const int64_t choice = (t + rank) % counts[expert];
      slots[index] = candidates[expert * width + choice];
    }
  }
}

}  // namespace
}  // namespace moe_ep

MOE_EP_EXPORT int MoeEpSelectReplicas(int nparam, void **params, int *ndims, int64_t **shapes,
                                      const char **dtypes, void * /*stream*/, void * /*extra*/) {
  return moe_ep::RunKernel("MoeEpSelectReplicas", [&] {
    moe_ep::SelectReplicas(moe_ep::BindArgsAs<moe_ep::SelectReplicasArgs>(nparam, params, ndims,
                                                                           shapes, dtypes));
  });
}
