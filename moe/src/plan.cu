// The routing plan on the device (see plan.rs, RoutingPlan::new for the CPU reference): the T·k
// (token, choice) entries sorted by expert, stably (entry i = token · k + choice before entry
// i' > i of the same expert), so the result is the reference's bit for bit.
//
// One block of 32 warps. Warp w owns entries [w·seg, (w + 1)·seg) and walks them 32 at a time;
// lanes holding the same expert find each other with match.any, so a lane's rank among its
// chunk's entries of that expert is the number of lower lanes in its match mask.
// Pass 1 counts each warp's entries per expert; the counts are turned into each (warp, expert)'s
// first slot (experts in order, warps in order within an expert); pass 2 walks the entries again
// and writes each into its slot. An expert >= num_experts gets no slot: its entry's slot_of is
// ~0 (the combine then gives the token NaN), and the slots left over at the end hold token ~0
// (gathered as NaN rows), weight NaN and expert 0, so a bad routing shows in the loss.

#define PLAN_WARPS 32
#define PLAN_MAX_EXPERTS 256
#define FULL 0xffffffffu

extern "C" __global__ void __launch_bounds__(PLAN_WARPS * 32)
    routing_plan(unsigned int* offsets, unsigned int* token, unsigned int* choice, float* weight,
                 unsigned int* slot_of, unsigned int* slot_expert, const unsigned int* experts,
                 const float* weights, unsigned int n, unsigned int k, unsigned int num_experts) {
    __shared__ unsigned int first[PLAN_WARPS][PLAN_MAX_EXPERTS];  // counts, then first slots
    __shared__ unsigned int total;
    const unsigned int tid = threadIdx.x, w = tid / 32, lane = tid % 32;
    const unsigned int ne = num_experts;
    for (unsigned int i = tid; i < PLAN_WARPS * ne; i += blockDim.x) first[i / ne][i % ne] = 0;
    __syncthreads();
    const unsigned int seg = (n + PLAN_WARPS - 1) / PLAN_WARPS;
    const unsigned int lo = min(w * seg, n), hi = min(lo + seg, n);
    const unsigned int below = (1u << lane) - 1u;
    // Pass 1: entries per (warp, expert). The lowest lane of each match group adds the group.
    for (unsigned int c = lo; c < hi; c += 32) {
        const unsigned int i = c + lane;
        const unsigned int e = i < hi ? experts[i] : FULL;
        const unsigned int same = __match_any_sync(FULL, e);
        if (e < ne && (same & below) == 0u) first[w][e] += __popc(same);
        __syncwarp();
    }
    __syncthreads();
    // Each expert's count, and each warp's entries before it within the expert.
    for (unsigned int e = tid; e < ne; e += blockDim.x) {
        unsigned int run = 0;
        for (unsigned int v = 0; v < PLAN_WARPS; ++v) {
            const unsigned int cnt = first[v][e];
            first[v][e] = run;
            run += cnt;
        }
        offsets[e + 1] = run;  // the count for now
    }
    __syncthreads();
    if (tid == 0) {
        unsigned int run = 0;
        offsets[0] = 0;
        for (unsigned int e = 0; e < ne; ++e) {
            run += offsets[e + 1];
            offsets[e + 1] = run;
        }
        total = run;
    }
    __syncthreads();
    for (unsigned int e = tid; e < ne; e += blockDim.x) {
        const unsigned int base = offsets[e];
        for (unsigned int v = 0; v < PLAN_WARPS; ++v) first[v][e] += base;
    }
    __syncthreads();
    // Pass 2: each entry into its slot.
    for (unsigned int c = lo; c < hi; c += 32) {
        const unsigned int i = c + lane;
        const unsigned int e = i < hi ? experts[i] : FULL;
        const unsigned int same = __match_any_sync(FULL, e);
        if (i < hi) {
            if (e < ne) {
                const unsigned int s = first[w][e] + __popc(same & below);
                token[s] = i / k;
                choice[s] = i % k;
                weight[s] = weights[i];
                slot_expert[s] = e;
                slot_of[i] = s;
            } else {
                slot_of[i] = FULL;
            }
        }
        __syncwarp();
        if (e < ne && (same & below) == 0u) first[w][e] += __popc(same);
        __syncwarp();
    }
    for (unsigned int s = total + tid; s < n; s += blockDim.x) {
        token[s] = FULL;
        choice[s] = 0;
        weight[s] = __int_as_float(0x7fc00000);
        slot_expert[s] = 0;
    }
}
