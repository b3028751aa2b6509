// Exact greedy projective pruning: r removal steps in one kernel launch.
//
// Input: H = (G + lam*I)^-1 with G = W W^T (n x n, symmetric, row-major with
// leading dimension ld >= n). Output: order[t] = unit removed at step t and
// dist2[t] = its squared projection residual d^2 at that step.
//
// Math (METHODS.md C.1 / C.3, "exact alternative"). Let A be the alive set and
// M = G + lam*I. Keep the invariant H[A, A] == (M[A, A])^-1.
//  * Score of alive k:  d_k^2 = 1/H_kk - lam * sum_{j in A} H_kj^2 / H_kk^2
//                             = (H_kk - lam * s_k) / H_kk^2,
//    the squared ridge residual of row k regressed on the other alive rows.
//  * Remove i = argmin d^2 (ties -> smallest index).
//  * Downdate: for A' = A \ {i}, block inversion (Schur complement of the
//    1x1 block H_ii) gives
//        (M[A', A'])^-1 = H[A', A'] - H[A', i] H[i, A'] / H_ii,
//    so updating the alive rows in place restores the invariant for A'.
//    Nothing is reallocated: dead rows are skipped (a per-row alive flag) and
//    dead columns are set to zero, so a row sum over all n columns equals the
//    sum over alive columns. Each alive row k uses only row k and the pivot
//    row i (never written in that step: i is dead), so rows update
//    independently; H stays symmetric up to rounding, so row norms serve as
//    the column norms of the closed form.
//
// Parallel layout: a grid of co-resident blocks (cooperative launch); every
// warp owns rows k = warp_id, warp_id + total_warps, ... for the whole run
// (only the owner touches row k and alive[k]). One step = one pass over the
// owned rows (downdate by the previous pivot + score), a block argmin, a grid
// barrier, and a redundant per-block argmin over the block partials, so each
// block knows the next pivot without a second barrier. Partials are double
// buffered by step parity: a block can only overwrite a buffer after every
// block has passed the barrier that follows its last read of it.
//
// The wrapper pads ld to a multiple of 32 elements so that no cache line is
// shared by two rows owned by different blocks.

#ifndef GP_BLOCK
#define GP_BLOCK 256  // threads per block; greedy_projective.py launches with this size
#endif
#define GP_WARPS (GP_BLOCK / 32)
#define GP_FULL 0xffffffffu

__device__ __forceinline__ float gp_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double gp_fma(double a, double b, double c) { return fma(a, b, c); }

// Strict total order on (score, index): smaller score first, ties -> smaller index.
__device__ __forceinline__ bool gp_better(double s1, int i1, double s2, int i2) {
    return s1 < s2 || (s1 == s2 && i1 < i2);
}

// Butterfly argmin: every lane ends with the warp-wide minimum pair.
__device__ __forceinline__ void gp_warp_argmin(double &s, int &i) {
    for (int off = 16; off > 0; off >>= 1) {
        double so = __shfl_xor_sync(GP_FULL, s, off);
        int io = __shfl_xor_sync(GP_FULL, i, off);
        if (gp_better(so, io, s, i)) { s = so; i = io; }
    }
}

__device__ __forceinline__ double gp_warp_sum(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(GP_FULL, v, off);
    return v;
}

// Grid-wide barrier on bar[0] (arrival count) and bar[1] (generation). Needs
// all blocks resident at once, which the cooperative launch guarantees.
// Fences make every write before the barrier visible to every block after it.
__device__ void gp_grid_sync(unsigned int *bar) {
    __syncthreads();
    if (gridDim.x == 1) return;
    if (threadIdx.x == 0) {
        volatile unsigned int *gen = bar + 1;
        unsigned int g = *gen;  // read before arriving: it cannot move until we arrive
        __threadfence();
        if (atomicAdd(bar, 1u) == gridDim.x - 1) {
            atomicExch(bar, 0u);  // reset before release so the next barrier starts at 0
            __threadfence();
            atomicAdd(bar + 1, 1u);
        } else {
            while (*gen == g) {
#if __CUDA_ARCH__ >= 700
                __nanosleep(32);
#endif
            }
        }
        __threadfence();
    }
    __syncthreads();
}

template <typename T>
__device__ void gp_greedy(T *H, int n, int ld, int r, double lam, int *order, double *dist2,
                          signed char *alive, double *part_score, int *part_index,
                          unsigned int *bar) {
    __shared__ double sh_score[GP_WARPS];
    __shared__ int sh_index[GP_WARPS];
    __shared__ int sh_piv;

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int gwarp = blockIdx.x * GP_WARPS + warp;
    const int nwarps = gridDim.x * GP_WARPS;
    const double inf = __longlong_as_double(0x7ff0000000000000LL);

    for (int k = gwarp; k < n; k += nwarps)
        if (lane == 0) alive[k] = 1;  // only lane 0 of the owner warp ever reads or writes it

    int piv = -1;  // unit removed in the previous step; -1 before the first
    for (int t = 0; t < r; ++t) {
        double best_s = inf;
        int best_i = n;  // (inf, n) loses to any alive row, so some alive row is always picked
        const T *Hi = piv >= 0 ? H + (size_t)piv * ld : nullptr;
        const T hii = piv >= 0 ? Hi[piv] : T(1);

        for (int k = gwarp; k < n; k += nwarps) {
            // Loads broadcast from lane 0: the shuffle orders every lane's read
            // before any lane's write of the same word later in this iteration.
            if (!__shfl_sync(GP_FULL, lane == 0 ? (int)alive[k] : 0, 0)) continue;
            if (k == piv) {  // dies now; its row stays intact for the other warps' downdates
                if (lane == 0) alive[k] = 0;
                continue;
            }
            T *Hk = H + (size_t)k * ld;
            const T f = piv >= 0 ? __shfl_sync(GP_FULL, lane == 0 ? Hk[piv] : T(0), 0) / hii : T(0);
            double s = 0.0;
            T diag = T(0);
            for (int j = lane; j < n; j += 32) {
                T h = Hk[j];
                if (piv >= 0) {
                    h = (j == piv) ? T(0) : gp_fma(-f, Hi[j], h);
                    Hk[j] = h;
                }
                if (j == k) diag = h;
                s += (double)h * (double)h;
            }
            s = gp_warp_sum(s);
            const double hkk = (double)__shfl_sync(GP_FULL, diag, k & 31);
            double score = (hkk - lam * s) / (hkk * hkk);
            if (score != score) score = inf;  // NaN after a numerical breakdown never wins
            if (gp_better(score, k, best_s, best_i)) { best_s = score; best_i = k; }
        }

        // Block argmin of the warp bests -> this block's partial for step t.
        if (lane == 0) { sh_score[warp] = best_s; sh_index[warp] = best_i; }
        __syncthreads();
        const int buf = (t & 1) * gridDim.x;
        if (warp == 0) {
            double s = lane < GP_WARPS ? sh_score[lane] : inf;
            int i = lane < GP_WARPS ? sh_index[lane] : n;
            gp_warp_argmin(s, i);
            if (lane == 0) { part_score[buf + blockIdx.x] = s; part_index[buf + blockIdx.x] = i; }
        }
        gp_grid_sync(bar);

        // Every block reduces all partials itself: same data, same order -> same pivot.
        if (warp == 0) {
            double s = inf;
            int i = n;
            for (int b = lane; b < gridDim.x; b += 32) {
                const double sb = __ldcg(part_score + buf + b);
                const int ib = __ldcg(part_index + buf + b);
                if (gp_better(sb, ib, s, i)) { s = sb; i = ib; }
            }
            gp_warp_argmin(s, i);
            if (lane == 0) {
                sh_piv = i;
                if (blockIdx.x == 0) { order[t] = i; dist2[t] = s; }
            }
        }
        __syncthreads();
        piv = sh_piv;
    }
}

extern "C" __global__ void __launch_bounds__(GP_BLOCK)
greedy_projective_f32(float *H, int n, int ld, int r, double lam, int *order, double *dist2,
                      signed char *alive, double *part_score, int *part_index, unsigned int *bar) {
    gp_greedy<float>(H, n, ld, r, lam, order, dist2, alive, part_score, part_index, bar);
}

extern "C" __global__ void __launch_bounds__(GP_BLOCK)
greedy_projective_f64(double *H, int n, int ld, int r, double lam, int *order, double *dist2,
                      signed char *alive, double *part_score, int *part_index, unsigned int *bar) {
    gp_greedy<double>(H, n, ld, r, lam, order, dist2, alive, part_score, part_index, bar);
}
