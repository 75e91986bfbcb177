// Host emulation of csrc/guidance_kernels.cuh (run by tests/test_csrc_emulated.py): every block and thread of
// a launch runs serially on the CPU, so the index logic (vector/scalar path, strides, offsets, both grid-stride
// loops, shift reading way uncond_index before writing it) is checked against a double-precision expectation.
// "kernels_emu.h" is the header with each <<<...>>> launch rewritten to emu_launch(...).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <random>
#include <vector>
static dim3 emu_blockIdx, emu_threadIdx, emu_blockDim, emu_gridDim;
static long long emu_blocks = 0;
#define blockIdx emu_blockIdx
#define threadIdx emu_threadIdx
#define blockDim emu_blockDim
#define gridDim emu_gridDim
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__
template <class F> void emu_launch(dim3 grid, int threads, F f) {
  if (grid.y > 65535 || grid.x < 1 || grid.y < 1) { printf("bad grid %u %u\n", grid.x, grid.y); exit(1); }
  emu_gridDim = grid; emu_blockDim = dim3(threads, 1, 1);
  for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
    emu_blockIdx = dim3(bx, by, 0); ++emu_blocks;
    for (int t = 0; t < threads; ++t) { emu_threadIdx = dim3(t, 0, 0); f(); }
  }
}
#include "kernels_emu.h"
using namespace sag_fast;
static std::mt19937_64 rng(1234);
static int64_t rnd(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
template <class T> T tf(float x);
template <> float tf<float>(float x) { return x; }
template <> __half tf<__half>(float x) { return __float2half_rn(x); }
template <> __nv_bfloat16 tf<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
static float ff(float x) { return x; }
static float ff(__half x) { return __half2float(x); }
static float ff(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> T* buf(int64_t n) {  // 64-byte aligned, filled with random values
  T* p = static_cast<T*>(aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64 + 64));
  std::uniform_real_distribution<float> u(-2, 2);
  for (int64_t i = 0; i < n; ++i) p[i] = tf<T>(u(rng));
  return p;
}
static int fails = 0;
static void check(bool ok, const char* what, int64_t idx, double got, double want) {
  if (!ok && fails++ < 10) printf("MISMATCH %s at %lld: got %g want %g\n", what, (long long)idx, got, want);
}
struct Layout { int64_t n, C, plane, cs, bs, off, total; };
static Layout layout(int64_t n, int64_t C, int64_t plane, int vec, bool aligned) {
  Layout L{n, C, plane};
  int64_t m = aligned ? vec : 1;
  L.cs = plane + (rnd(0, 1) ? 0 : m * rnd(0, 3));
  L.bs = C * L.cs + (rnd(0, 1) ? 0 : m * rnd(0, 5));
  L.off = aligned ? (rnd(0, 1) ? 0 : vec * rnd(1, 3)) : rnd(0, 3);
  L.total = L.off + n * L.bs + 16;
  return L;
}
template <class T> void combine_case(int64_t B, int64_t C, int64_t G, int64_t Cd, int64_t plane, bool two, bool aligned, int sms) {
  const int vec = vec_width<T>();
  Layout P = layout(two ? 2 * B : B, C, plane, vec, aligned), D = layout(B, Cd, plane, vec, aligned);
  T* pb = buf<T>(P.total); T* db = buf<T>(D.total); T* ob = buf<T>(B * C * plane + 16);
  CombineArgs<T> a;
  a.uncond = pb + P.off; a.cond = a.uncond + (two ? B * P.bs : 0); a.degraded = db + D.off; a.out = ob;
  a.batch = B; a.channels = C; a.guided = G; a.plane = plane;
  a.pred_batch_stride = P.bs; a.pred_channel_stride = P.cs; a.deg_batch_stride = D.bs; a.deg_channel_stride = D.cs;
  a.cfg_scale = 3.5f; a.sag_scale = 0.75f; a.two_way = two;
  // sentinel past the output
  for (int i = 0; i < 16; ++i) ob[B * C * plane + i] = tf<T>(123.f);
  launch_guidance_combine(a, sms, nullptr);
  const double tol = sizeof(T) == 4 ? 1e-5 : 3e-2;
  for (int64_t b = 0; b < B; ++b) for (int64_t c = 0; c < C; ++c) for (int64_t i = 0; i < plane; ++i) {
    double u = ff(a.uncond[b * P.bs + c * P.cs + i]), cc = ff(a.cond[b * P.bs + c * P.cs + i]);
    double want;
    if (c >= G) want = cc;
    else { double d = ff(a.degraded[b * D.bs + c * D.cs + i]);
      want = two ? u + 3.5 * (cc - u) + 0.75 * (u - d) : u + 0.75 * (u - d); }
    int64_t o = (b * C + c) * plane + i; double got = ff(ob[o]);
    check(std::fabs(got - want) <= tol * (1 + std::fabs(want)), "combine", o, got, want);
  }
  for (int i = 0; i < 16; ++i) check(ff(ob[B * C * plane + i]) == 123.f, "combine sentinel", i, 0, 0);
  free(pb); free(db); free(ob);
}
template <class T> void shift_case(int64_t B, int64_t ways, int64_t ui, int64_t C, int64_t G, int64_t Cd, int64_t plane, bool aligned, int sms) {
  const int vec = vec_width<T>();
  Layout P = layout(ways * B, C, plane, vec, aligned), D = layout(B, Cd, plane, vec, aligned);
  T* pb = buf<T>(P.total); T* db = buf<T>(D.total);
  std::vector<float> before(P.total);
  for (int64_t i = 0; i < P.total; ++i) before[i] = ff(pb[i]);
  ShiftArgs<T> a;
  a.pred = pb + P.off; a.degraded = db + D.off; a.batch = B; a.ways = ways; a.uncond_index = ui; a.guided = G; a.plane = plane;
  a.pred_batch_stride = P.bs; a.pred_channel_stride = P.cs; a.deg_batch_stride = D.bs; a.deg_channel_stride = D.cs;
  a.sag_scale = 0.75f;
  launch_guidance_shift(a, sms, nullptr);
  const double tol = sizeof(T) == 4 ? 1e-5 : 3e-2;
  std::vector<char> touched(P.total, 0);
  for (int64_t w = 0; w < ways; ++w) for (int64_t b = 0; b < B; ++b) for (int64_t c = 0; c < C; ++c) for (int64_t i = 0; i < plane; ++i) {
    int64_t at = P.off + (w * B + b) * P.bs + c * P.cs + i;
    touched[at] = 1;
    double want = before[at];
    if (c < G) {
      double u = before[P.off + (ui * B + b) * P.bs + c * P.cs + i], d = ff(a.degraded[b * D.bs + c * D.cs + i]);
      want += 0.75 * (u - d);
    }
    double got = ff(pb[at]);
    check(std::fabs(got - want) <= tol * (1 + std::fabs(want)), "shift", at, got, want);
  }
  for (int64_t i = 0; i < P.total; ++i) if (!touched[i]) check(ff(pb[i]) == before[i], "shift outside pred", i, ff(pb[i]), before[i]);
  free(pb); free(db);
}
template <class T> void run_random(int n) {
  for (int k = 0; k < n; ++k) {
    int64_t B = rnd(1, 3), C = rnd(1, 6), G = rnd(1, C), Cd = G + rnd(0, 2);
    int vec = vec_width<T>();
    int64_t plane = rnd(0, 1) ? vec * rnd(1, 40) : rnd(1, 300);
    bool aligned = rnd(0, 3) != 0; int sms = rnd(1, 4);
    combine_case<T>(B, C, G, Cd, plane, rnd(0, 1), aligned, sms);
    int64_t ways = rnd(1, 3);
    shift_case<T>(B, ways, rnd(0, ways - 1), C, G, Cd, plane, aligned, sms);
  }
}
int main() {
  run_random<float>(300); run_random<__half>(200); run_random<__nv_bfloat16>(100);
  // plane loop past gridDim.y (65535) and x grid stride with few SMs
  combine_case<float>(9000, 16, 16, 16, 3, true, false, 132);
  combine_case<float>(9000, 8, 5, 8, 4, true, true, 132);
  shift_case<float>(9000, 2, 1, 8, 8, 8, 4, true, 132);
  combine_case<__half>(1, 2, 1, 1, 64 * 1024 + 8, true, true, 1);
  shift_case<__half>(1, 3, 2, 2, 2, 2, 64 * 1024 + 8, true, 1);
  shift_case<float>(1, 2, 0, 1, 1, 1, 12345, false, 1);
  printf("blocks emulated: %lld, failures: %d\n", emu_blocks, fails);
  return fails != 0;
}
