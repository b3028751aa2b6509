"""The CUDA C greedy projective-pruning kernel: compile checks, the kernel's algorithm
against a brute-force greedy, the kernel source itself run on host threads, and (on a GPU
machine) the launched kernel against the brute force."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from secateur.kernels.cuda import greedy_projective as gp


# ---------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------
def ridge_residuals(W: torch.Tensor, alive: list[int], lam: float) -> torch.Tensor:
    """d_i for every alive row, straight from the definition (METHODS.md C.1): regress
    w_i on the other alive rows with a ridge solve and take the residual norm."""
    d = torch.empty(len(alive), dtype=torch.float64)
    for a, i in enumerate(alive):
        others = W[[j for j in alive if j != i]]
        wi = W[i]
        if len(others) == 0:
            d[a] = wi.norm()
            continue
        q = torch.linalg.solve(others @ others.T + lam * torch.eye(len(others), dtype=W.dtype), others @ wi)
        d[a] = (others.T @ q - wi).norm()
    return d


def bruteforce_greedy(W: torch.Tensor, r: int, lam: float) -> tuple[list[int], list[float]]:
    """Greedy removal recomputing every score from scratch each step (float64 torch);
    ties go to the smallest index (torch.argmin over ascending indices)."""
    W = W.double().cpu()
    alive = list(range(W.shape[0]))
    order, dist = [], []
    for _ in range(r):
        d = ridge_residuals(W, alive, lam)
        a = int(torch.argmin(d))
        order.append(alive.pop(a))
        dist.append(float(d[a]))
    return order, dist


def closed_form_greedy(W: torch.Tensor, r: int, lam: float) -> list[int]:
    """Greedy removal with the closed-form scores (METHODS.md C.1) from a fresh inverse of
    the reduced Gram matrix every step (no downdates); runs on W's device in float64."""
    W = W.double()
    alive = torch.arange(W.shape[0], device=W.device)
    order = []
    for _ in range(r):
        Wa = W[alive]
        H = torch.linalg.inv(Wa @ Wa.T + lam * torch.eye(len(alive), dtype=W.dtype, device=W.device))
        h = H.diagonal()
        a = int(torch.argmin(1 / h - lam * (H * H).sum(0) / h**2))
        order.append(int(alive[a]))
        alive = torch.cat([alive[:a], alive[a + 1 :]])
    return order


def emulate_kernel(H: np.ndarray, r: int, lam: float, grid: int = 1, warps: int = 8) -> tuple[list[int], np.ndarray]:
    """numpy transcription of greedy_projective.cu: the same row ownership (warp w of block
    b owns rows b*warps + w + k*grid*warps), the same in-place masked downdate (dead column
    zeroed, pivot row left intact), the same (score, index) order and reductions."""
    H = H.copy()
    n = H.shape[0]
    alive = np.ones(n, dtype=bool)
    nwarps = grid * warps
    piv, order = -1, []
    for _ in range(r):
        partials = []
        for b in range(grid):
            warp_bests = []
            for w in range(warps):
                best = (math.inf, n)
                for k in range(b * warps + w, n, nwarps):
                    if not alive[k]:
                        continue
                    if k == piv:
                        alive[k] = False
                        continue
                    if piv >= 0:
                        f = H[k, piv] / H[piv, piv]
                        H[k] -= f * H[piv]
                        H[k, piv] = 0.0
                    s = float(np.sum(H[k] ** 2))
                    score = (H[k, k] - lam * s) / H[k, k] ** 2
                    best = min(best, (math.inf if math.isnan(score) else score, k))
                warp_bests.append(best)
            partials.append(min(warp_bests))
        piv = min(partials)[1]
        order.append(piv)
    return order, H


def inverse_gram(W: torch.Tensor, lam: float) -> np.ndarray:
    W = W.double()
    return torch.linalg.inv(W @ W.T + lam * torch.eye(W.shape[0], dtype=torch.float64)).numpy()


CASES = [  # (n, m, lam, r, seed): tall, wide (lam > 0 needed), lam = 0, several lambdas
    (10, 16, 1e-3, 9, 0),
    (12, 8, 1e-3, 11, 1),
    (9, 20, 0.0, 9, 2),  # r = n: down to the last row
    (11, 11, 0.1, 10, 3),
    (14, 30, 10.0, 12, 4),
]


def random_w(n: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, m, generator=g, dtype=torch.float64)
    # Plant near-duplicates so that the greedy order is not just "smallest norm first".
    W[1] = W[0] + 0.05 * torch.randn(m, generator=g, dtype=torch.float64)
    W[n - 1] = 0.5 * W[2] - W[3] + 0.02 * torch.randn(m, generator=g, dtype=torch.float64)
    return W


# ---------------------------------------------------------------------------------------
# Compile checks (nvcc, no GPU needed)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["75", "90"])
def test_compile_check_builds_float_and_double_kernels(arch):
    cubin = gp.compile_check(arch)
    assert isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF"
    assert b"greedy_projective_f32" in cubin
    assert b"greedy_projective_f64" in cubin


def test_compile_check_rejects_bad_arch():
    with pytest.raises(ValueError, match="arch"):
        gp.compile_check("sm_90")


# ---------------------------------------------------------------------------------------
# The kernel's algorithm (numpy transcription) against the brute force
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m,lam,r,seed", CASES)
def test_kernel_algorithm_matches_bruteforce(n, m, lam, r, seed):
    W = random_w(n, m, seed)
    expected, _ = bruteforce_greedy(W, r, lam)
    H = inverse_gram(W, lam)
    for grid, warps in [(1, 8), (3, 2), (2, 1)]:  # the order must not depend on the launch shape
        order, _ = emulate_kernel(H, r, lam, grid, warps)
        assert order == expected, (grid, warps)


def test_closed_form_oracle_agrees_with_ridge_oracle():
    for n, m, lam, r, seed in CASES:
        W = random_w(n, m, seed)
        assert closed_form_greedy(W, r, lam) == bruteforce_greedy(W, r, lam)[0]


def test_masked_downdate_is_inverse_of_reduced_matrix():
    W, lam, r = random_w(12, 20, 5), 1e-3, 5
    order, H = emulate_kernel(inverse_gram(W, lam), r - 1, lam)
    dead = order + [order[-1]]  # the last pivot is chosen but not yet applied
    alive = [k for k in range(12) if k not in order[:-1]]
    Wa = W[alive].double()
    expected = torch.linalg.inv(Wa @ Wa.T + lam * torch.eye(len(alive), dtype=torch.float64)).numpy()
    np.testing.assert_allclose(H[np.ix_(alive, alive)], expected, rtol=1e-9, atol=1e-12)
    for i in dead[:-2]:  # columns of applied pivots are zero in every alive row
        assert np.all(H[alive, i] == 0.0)


def test_kernel_algorithm_breaks_ties_by_smallest_index():
    # W = 2I: H = I/(4 + lam) exactly, every score is bitwise equal at every step.
    n, r, lam = 9, 7, 1e-3
    W = 2.0 * torch.eye(n, dtype=torch.float64)
    expected, _ = bruteforce_greedy(W, r, lam)
    assert expected == list(range(r))
    for grid, warps in [(1, 8), (3, 1)]:
        assert emulate_kernel(inverse_gram(W, lam), r, lam, grid, warps)[0] == expected


# ---------------------------------------------------------------------------------------
# The .cu source itself, run on CPU threads: one process per block (its statics are the
# block's shared memory), one thread per CUDA thread, shuffles and __syncthreads as
# barriers, the grid barrier's atomics on memory shared between the processes.
# ---------------------------------------------------------------------------------------
HOST_SHIM = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __CUDA_ARCH__ 900
struct dim3 { unsigned x = 0, y = 1, z = 1; };
static thread_local dim3 threadIdx;
static dim3 blockIdx, gridDim;
static std::barrier<> *block_bar;
static std::barrier<> *warp_bar[32];
static uint64_t slots[32][32];

inline void __syncthreads() { block_bar->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { sched_yield(); }
inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned *p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
template <typename T> T __ldcg(const T *p) { return *(const volatile T *)p; }
template <typename T> T __shfl_sync(unsigned, T v, int src) {
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    slots[w][l] = bits;
    warp_bar[w]->arrive_and_wait();
    bits = slots[w][src & 31];
    warp_bar[w]->arrive_and_wait();
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
template <typename T> T __shfl_xor_sync(unsigned m, T v, int x) {
    return __shfl_sync(m, v, (int)(threadIdx.x & 31) ^ x);
}
"""

HOST_MAIN = r"""
// argv: dtype(32|64) n ld r lam grid in_file out_file
int main(int argc, char **argv) {
    const int bits = atoi(argv[1]), n = atoi(argv[2]), ld = atoi(argv[3]), r = atoi(argv[4]);
    const double lam = atof(argv[5]);
    const int grid = atoi(argv[6]);
    const size_t esz = bits == 32 ? 4 : 8, hbytes = ((size_t)n * ld * esz + 63) / 64 * 64;
    const size_t total = hbytes + r * 12 + n + grid * 24 + 16;
    char *mem = (char *)mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    std::memset(mem, 0, total);
    FILE *f = fopen(argv[7], "rb");
    if (fread(mem, esz, (size_t)n * ld, f) != (size_t)n * ld) return 3;
    fclose(f);
    char *p = mem + hbytes;
    double *dist2 = (double *)p; p += r * 8;
    double *part_score = (double *)p; p += grid * 16;
    int *order = (int *)p; p += r * 4;
    int *part_index = (int *)p; p += grid * 8;
    unsigned *bar = (unsigned *)p; p += 8;
    signed char *alive = (signed char *)p;
    gridDim.x = grid;
    for (int b = 0; b < grid; ++b) {
        if (fork() == 0) {
            blockIdx.x = b;
            block_bar = new std::barrier<>(GP_BLOCK);
            for (int w = 0; w < GP_WARPS; ++w) warp_bar[w] = new std::barrier<>(32);
            std::vector<std::thread> threads;
            for (int t = 0; t < GP_BLOCK; ++t)
                threads.emplace_back([=] {
                    threadIdx.x = t;
                    if (bits == 32)
                        greedy_projective_f32((float *)mem, n, ld, r, lam, order, dist2, alive, part_score, part_index, bar);
                    else
                        greedy_projective_f64((double *)mem, n, ld, r, lam, order, dist2, alive, part_score, part_index, bar);
                });
            for (auto &t : threads) t.join();
            _exit(0);
        }
    }
    int status, failed = 0;
    for (int b = 0; b < grid; ++b) { wait(&status); failed |= !(WIFEXITED(status) && WEXITSTATUS(status) == 0); }
    if (failed) return 4;
    FILE *o = fopen(argv[8], "wb");
    fwrite(order, 4, r, o);
    fwrite(dist2, 8, r, o);
    fclose(o);
    return 0;
}
"""


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++20 compiler (g++) is needed to run the kernel source on the host"
    d = tmp_path_factory.mktemp("host_kernel")
    src = d / "host.cpp"
    # 64 threads = 2 warps per block: several warps and blocks on a 2-core machine.
    src.write_text("#define GP_BLOCK 64\n" + HOST_SHIM + gp.source() + HOST_MAIN)
    exe = d / "host_kernel"
    subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", str(src), "-o", str(exe)], check=True, capture_output=True)

    def run(H: np.ndarray, r: int, lam: float, grid: int, ld: int) -> tuple[list[int], np.ndarray]:
        n = H.shape[0]
        padded = np.zeros((n, ld), dtype=H.dtype)
        padded[:, :n] = H
        (d / "H.bin").write_bytes(padded.tobytes())
        bits = "32" if H.dtype == np.float32 else "64"
        args = [str(exe), bits, str(n), str(ld), str(r), repr(lam), str(grid), str(d / "H.bin"), str(d / "out.bin")]
        subprocess.run(args, check=True, timeout=60)
        raw = (d / "out.bin").read_bytes()
        return np.frombuffer(raw[: 4 * r], dtype=np.int32).tolist(), np.frombuffer(raw[4 * r :], dtype=np.float64)

    return run


@pytest.mark.parametrize("n,m,lam,r,seed", CASES[:3])
def test_kernel_source_on_host_threads_matches_bruteforce(host_kernel, n, m, lam, r, seed):
    W = random_w(n, m, seed)
    expected, dist = bruteforce_greedy(W, r, lam)
    H = inverse_gram(W, lam)
    for grid, ld in [(1, n), (3, n + 3)]:  # single block (no grid barrier) and a 3-block grid
        order, dist2 = host_kernel(H, r, lam, grid, ld)
        assert order == expected, (grid, ld)
        np.testing.assert_allclose(np.sqrt(np.maximum(dist2, 0)), dist, rtol=1e-6, atol=1e-9)


def test_kernel_source_on_host_threads_float32_ties(host_kernel):
    n, r, lam = 10, 8, 1e-3
    H = inverse_gram(2.0 * torch.eye(n, dtype=torch.float64), lam).astype(np.float32)
    order, _ = host_kernel(H, r, lam, grid=2, ld=32)
    assert order == list(range(r))


# ---------------------------------------------------------------------------------------
# Python wrapper behaviour that needs no GPU
# ---------------------------------------------------------------------------------------
def test_wrapper_feeds_padded_inverse_to_kernel(monkeypatch, host_kernel):
    """Everything but the CuPy launch itself, on CPU: validation, H = (W W^T + lam I)^-1
    padded to ld, dtype choice, the returned order and distances (launch = host-thread run)."""
    seen = {}

    def host_launch(cupy, H, n, ld, r, lam):
        seen.update(dtype=H.dtype, ld=ld)
        assert H.shape == (n, ld) and ld % gp.LD_MULTIPLE == 0 and not H[:, n:].any()
        order, dist2 = host_kernel(H[:, :n].numpy(), r, lam, grid=2, ld=ld)
        return torch.tensor(order, dtype=torch.int32), torch.from_numpy(dist2.copy())

    monkeypatch.setattr(gp, "_launch", host_launch)
    monkeypatch.setattr(gp, "_cupy", lambda: types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True)))
    monkeypatch.setattr(gp, "_as_torch_cuda", lambda W: W)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    n, m, lam, r, seed = CASES[0]
    W = random_w(n, m, seed)
    expected, dist = bruteforce_greedy(W, r, lam)
    order, d = gp.greedy_order_cuda(W.reshape(n, 4, m // 4), r, lam, return_dist=True)
    assert order.dtype == torch.long and order.tolist() == expected
    torch.testing.assert_close(d, torch.tensor(dist, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    assert seen == {"dtype": torch.float64, "ld": 32}
    assert gp.greedy_order_cuda(W.float(), r, lam).tolist() == expected  # float32 working copy
    assert seen["dtype"] == torch.float32
    assert gp.greedy_order_cuda(W, 0, lam).numel() == 0
    with pytest.raises(ValueError, match="r must be in"):
        gp.greedy_order_cuda(W, n + 1, lam)
    with pytest.raises(ValueError, match="lam > 0"):
        gp.greedy_order_cuda(W[:, :4], 2, 0.0)  # 10 rows in 4 dims: singular without ridge


def test_greedy_order_cuda_without_gpu_raises_runtime_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        gp.greedy_order_cuda(torch.randn(4, 6), 2)


def test_greedy_order_cuda_validates_arguments():
    with pytest.raises(ValueError, match="r"):
        gp.greedy_order_cuda(torch.randn(4, 6), 2.5)
    with pytest.raises(ValueError, match="lam"):
        gp.greedy_order_cuda(torch.randn(4, 6), 2, lam=-1.0)
    with pytest.raises(ValueError, match="dtype"):
        gp.greedy_order_cuda(torch.randn(4, 6), 2, dtype=torch.float16)


def test_module_imports_without_cupy():
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "from secateur.kernels.cuda import greedy_projective as gp\n"
        "try:\n    gp.compile_check()\nexcept RuntimeError as e:\n    print('RuntimeError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "RuntimeError" in out and "secateur[cuda]" in out


# ---------------------------------------------------------------------------------------
# The launched kernel (GPU machines only)
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_order_cuda_matches_bruteforce_on_gpu():
    import cupy

    for n, m, lam, r, seed in CASES:
        W = random_w(n, m, seed)
        expected, dist = bruteforce_greedy(W, r, lam)
        order, d = gp.greedy_order_cuda(W.cuda(), r, lam, return_dist=True)
        assert order.dtype == torch.long and order.device.type == "cuda"
        assert order.tolist() == expected
        torch.testing.assert_close(d.cpu(), torch.tensor(dist, dtype=torch.float64), rtol=1e-6, atol=1e-9)
        assert gp.greedy_order_cuda(cupy.asarray(W.numpy()), r, lam).tolist() == expected

        # float32: each pick must be optimal, within fp32 error, among the rows still alive.
        order32 = gp.greedy_order_cuda(W.float().cuda(), r, lam).tolist()
        alive = list(range(n))
        for i in order32:
            d_alive = ridge_residuals(W, alive, lam)
            assert float(d_alive[alive.index(i)]) <= float(d_alive.min()) * (1 + 1e-3) + 1e-5
            alive.remove(i)

    # A layer large enough for a multi-block grid (75 blocks of 8 row-owning warps), and
    # exact ties (W = 2I: every score equal, so the order is 0, 1, 2, ...).
    W = random_w(600, 800, 7).cuda()
    expected = closed_form_greedy(W, 40, 1e-3)
    assert gp.greedy_order_cuda(W, 40, 1e-3).tolist() == expected
    eye = 2.0 * torch.eye(700, dtype=torch.float64, device="cuda")
    assert gp.greedy_order_cuda(eye, 50, 1e-3).tolist() == list(range(50))
    assert gp.greedy_order_cuda(eye, 0).numel() == 0
