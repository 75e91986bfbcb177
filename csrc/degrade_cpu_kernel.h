// The per-plane loops of the CPU kernel of sag_fast::degrade. No include guard on purpose: degrade_cpu.cpp includes
// this file twice, once for the baseline ISA and once under `#pragma GCC target("avx2")`, each time with
// a different SAG_DEGRADE_ISA namespace, and picks one at run time. The includer provides the headers
// (ATen/Parallel.h, c10 Half/BFloat16) and DegradeArgs before including it.
//
// Per task (one (b, c) plane, (b, c, frame) for video, or a chunk of its rows): s = c1*x + c2*o for the rows
// the chunk needs (reflect-padded by P columns) into buffer `s`, the horizontal taps row by row into buffer `h`, then
// per output row the vertical taps into `acc` and the blend y = x + m*(acc - s) straight into y.
// Taps run on blocks of 32 columns held in four 8-float GCC vectors (registers), so each tap is one
// load, one multiply and one add per vector; no FMA, so both ISAs give the same bits.

namespace sag_fast {
namespace degrade_cpu {
namespace SAG_DEGRADE_ISA {

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads/stores

__attribute__((always_inline)) inline vf8 load8(const float* p) { return *reinterpret_cast<const vf8u*>(p); }
__attribute__((always_inline)) inline void store8(float* p, vf8 v) { *reinterpret_cast<vf8u*>(p) = v; }

// dst[j] = sum_u g[u] * src[u][j] for j < n: the same code for both passes (horizontal: src[u] = row + u).
__attribute__((always_inline)) inline void taps(const float* const* src, const float* g, int64_t K,
                                                float* __restrict dst, int64_t n) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const float* s0 = src[0] + j;
    const float g0 = g[0];
    vf8 a0 = g0 * load8(s0), a1 = g0 * load8(s0 + 8), a2 = g0 * load8(s0 + 16), a3 = g0 * load8(s0 + 24);
    for (int64_t u = 1; u < K; ++u) {
      const float* su = src[u] + j;
      const float gu = g[u];
      a0 += gu * load8(su);
      a1 += gu * load8(su + 8);
      a2 += gu * load8(su + 16);
      a3 += gu * load8(su + 24);
    }
    store8(dst + j, a0);
    store8(dst + j + 8, a1);
    store8(dst + j + 16, a2);
    store8(dst + j + 24, a3);
  }
  for (; j + 8 <= n; j += 8) {
    vf8 a = g[0] * load8(src[0] + j);
    for (int64_t u = 1; u < K; ++u) a += g[u] * load8(src[u] + j);
    store8(dst + j, a);
  }
  for (; j < n; ++j) {
    float a = g[0] * src[0][j];
    for (int64_t u = 1; u < K; ++u) a += g[u] * src[u][j];
    dst[j] = a;
  }
}

// s[j] = c1*x[j] + c2*o[j] in fp32 (the reference's rounding: two products, one sum).
template <typename T>
__attribute__((always_inline)) inline void s_row(const T* x, int64_t sx, const T* o, int64_t so, float c1, float c2,
                                                 float* __restrict s, int64_t n) {
  if (sx == 1 && so == 1) {
    for (int64_t j = 0; j < n; ++j) s[j] = c1 * static_cast<float>(x[j]) + c2 * static_cast<float>(o[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] = c1 * static_cast<float>(x[j * sx]) + c2 * static_cast<float>(o[j * so]);
  }
}

// y[j] = x[j] + m[j]*(acc[j] - s[j]) (m == nullptr: m = 1), stored in T.
template <typename T>
__attribute__((always_inline)) inline void blend_row(const T* x, int64_t sx, const float* __restrict acc,
                                                     const float* __restrict s, const float* __restrict m, T* y,
                                                     int64_t sy, int64_t n) {
  if (sx == 1 && sy == 1) {
    if (m) {
      for (int64_t j = 0; j < n; ++j) y[j] = static_cast<T>(static_cast<float>(x[j]) + m[j] * (acc[j] - s[j]));
    } else {
      for (int64_t j = 0; j < n; ++j) y[j] = static_cast<T>(static_cast<float>(x[j]) + (acc[j] - s[j]));
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const float d = acc[j] - s[j];
      y[j * sy] = static_cast<T>(static_cast<float>(x[j * sx]) + (m ? m[j] * d : d));
    }
  }
}

template <typename T>
void run(const DegradeArgs& a) {
  const int64_t H = a.H, W = a.W, K = a.K, P = K / 2, WP = W + 2 * P;
  const int64_t rows = (H + a.chunks - 1) / a.chunks;  // output rows per task
  const int64_t tasks = a.B * a.C * a.F * a.chunks;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / (rows * W));
  const T* xb = static_cast<const T*>(a.x);
  const T* ob = static_cast<const T*>(a.o);
  T* yb = static_cast<T*>(a.y);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    // thread-local buffers, reused by every task of this range
    std::vector<float> sbuf((rows + 2 * P) * WP), hbuf((rows + 2 * P) * W), acc(W), mline(a.mask ? W : 0);
    std::vector<const float*> src(K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / a.chunks, chunk = task - plane * a.chunks;
      const int64_t bc = plane / a.F, fr = plane - bc * a.F;  // a plane is (b, c, frame)
      const int64_t b = bc / a.C, ch = bc - b * a.C;
      const int64_t r0 = chunk * rows, r1 = std::min(H, r0 + rows);
      if (r0 >= r1) continue;
      const int64_t lo = std::max<int64_t>(0, r0 - P), hi = std::min(H, r1 + P);  // input rows needed
      const T* xp = xb + b * a.sx[0] + ch * a.sx[1] + fr * a.sxf;
      const T* op = ob + b * a.so[0] + ch * a.so[1] + fr * a.sof;
      T* yp = yb + b * a.sy[0] + ch * a.sy[1] + fr * a.syf;
      const float c1 = a.c1[b], c2 = a.c2[b];
      for (int64_t r = lo; r < hi; ++r) {
        float* s = sbuf.data() + (r - lo) * WP;
        s_row(xp + r * a.sx[2], a.sx[3], op + r * a.so[2], a.so[3], c1, c2, s + P, W);
        for (int64_t i = 1; i <= P; ++i) {  // reflect: column -i is i, column W-1+i is W-1-i
          s[P - i] = s[P + i];
          s[P + W - 1 + i] = s[P + W - 1 - i];
        }
        for (int64_t u = 0; u < K; ++u) src[u] = s + u;
        taps(src.data(), a.g, K, hbuf.data() + (r - lo) * W, W);
      }
      int64_t m_src = -1;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t u = 0; u < K; ++u) {
          int64_t q = r + u - P;
          q = q < 0 ? -q : (q >= H ? 2 * (H - 1) - q : q);
          src[u] = hbuf.data() + (q - lo) * W;
        }
        taps(src.data(), a.g, K, acc.data(), W);
        const float* m = nullptr;
        if (a.mask) {
          if (a.mrow[r] != m_src) {  // rebuild the upsampled mask row only when its source row changes
            m_src = a.mrow[r];
            const float* mm = a.mask + ((b * a.mf + a.mframe[fr]) * a.mh + m_src) * a.mw;
            for (int64_t j = 0; j < W; ++j) mline[j] = mm[a.mcol[j]];
          }
          m = mline.data();
        }
        blend_row(xp + r * a.sx[2], a.sx[3], acc.data(), sbuf.data() + (r - lo) * WP + P, m, yp + r * a.sy[2],
                  a.sy[3], W);
      }
    }
  });
}

void dispatch(const DegradeArgs& a, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return run<float>(a);
    case at::kHalf: return run<c10::Half>(a);
    case at::kBFloat16: return run<c10::BFloat16>(a);
    default: TORCH_CHECK(false, "degrade: unexpected dtype ", dtype);
  }
}

}  // namespace SAG_DEGRADE_ISA
}  // namespace degrade_cpu
}  // namespace sag_fast
