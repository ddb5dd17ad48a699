// Flash attention (forward and backward) on the CPU where every query row reads its own key set: at most
// two key ranges. Sliding windows with sink tokens, streaming (sink + local) blocks, causality, padding
// and packed-document boundaries are all of that shape. torch's own CPU flash kernel only offers a
// top-left causal mask or a dense additive bias, so a banded pattern there either computes masked pairs
// or reads a bias per pair; here a tile of rows computes only the union of its rows' ranges, and masking
// is two bounds per row.
//
// Built on demand by lcplug/attention/range_kernel.py (torch.utils.cpp_extension). The products go to
// the BLAS torch links (sgemm_), the softmax to ATen's vectorised exp, the tiles to ATen's thread pool.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row-major C (m x n) = alpha * op(A) . op(B) + beta * C, op transposing where asked. Column-major BLAS
// sees every row-major buffer transposed, so it computes C^T = op(B)^T . op(A)^T.
void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
          float beta, float* c, int ldc) {
  const char op_b = tb ? 'T' : 'N', op_a = ta ? 'T' : 'N';
  sgemm_(&op_b, &op_a, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Masks row `s` of a chunk [c0, c0 + n) to its keys [a0, a1) U [b0, b1) (a1 <= b0, or a empty); returns its
// maximum.
float mask_row(float* s, int64_t n, int64_t c0, const int64_t* r) {
  auto local = [&](int64_t key) { return std::clamp<int64_t>(key - c0, 0, n); };
  int64_t a0 = local(r[0]), a1 = local(r[1]), b0 = local(r[2]), b1 = local(r[3]);
  if (a1 <= a0) {  // no first range: only the second
    a0 = a1 = b0;
  } else if (b1 > b0 && b0 <= a1) {  // the ranges touch in this chunk: one
    a1 = std::max(a1, b1);
    b0 = b1 = a1;
  }
  float best = kNegInf;
  auto max_of = [&](int64_t from, int64_t to) {
    if (to > from) {
      best = std::max(best, at::vec::reduce_all<float>(
                                [](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, s + from, to - from));
    }
  };
  std::fill(s, s + a0, kNegInf);
  max_of(a0, a1);
  std::fill(s + a1, s + std::max(a1, b0), kNegInf);
  max_of(std::max(a1, b0), b1);
  std::fill(s + std::max({a1, b0, b1}), s + n, kNegInf);
  return best;
}

// s <- exp(s - m) over n entries (-inf -> 0); returns their sum.
float exp_sum(float* s, int64_t n, float m) {
  const Vec vm(m);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec x = (Vec::loadu(s + j) - vm).exp_u20();
    x.store(s + j);
    acc = acc + x;
  }
  float total = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    total += s[j];
  }
  return total;
}

// The key spans a tile of m rows computes: the union of its rows' first ranges and that of their second
// ranges, merged when they meet.
std::vector<std::pair<int64_t, int64_t>> tile_spans(const int64_t* rows, int64_t m) {
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  int64_t span[4] = {kNone, 0, kNone, 0};
  for (int64_t i = 0; i < m; ++i) {
    for (int p = 0; p < 4; p += 2) {
      if (rows[i * 4 + p + 1] > rows[i * 4 + p]) {
        span[p] = std::min(span[p], rows[i * 4 + p]);
        span[p + 1] = std::max(span[p + 1], rows[i * 4 + p + 1]);
      }
    }
  }
  std::vector<std::pair<int64_t, int64_t>> spans;
  if (span[1] > 0 && span[3] > 0 && span[1] >= span[2]) {
    spans.emplace_back(std::min(span[0], span[2]), std::max(span[1], span[3]));
  } else {
    for (int p = 0; p < 4; p += 2) {
      if (span[p + 1] > 0) spans.emplace_back(span[p], span[p + 1]);
    }
  }
  return spans;
}

// q and what shares its layout (B, H, Lq, D) first, then k and v (B, Hk, Lk, D): float32, contiguous head dim.
void check_inputs(std::initializer_list<at::Tensor> tensors, const at::Tensor& ranges, int64_t tile_rows,
                  int64_t chunk_keys) {
  const at::Tensor& q = *tensors.begin();
  const at::Tensor& v = *(tensors.end() - 1);
  const at::Tensor& k = *(tensors.end() - 2);
  for (const auto& t : tensors) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 4 && t.stride(3) == 1,
                "range attention: float32 (B, H, L, D) tensors with a contiguous head dim expected");
  }
  TORCH_CHECK(tile_rows > 0 && chunk_keys > 0, "range attention: tile_rows and chunk_keys must be positive");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3) && q.size(1) % k.size(1) == 0,
              "range attention: k/v shapes do not match q");
  TORCH_CHECK(ranges.scalar_type() == at::kLong && ranges.sizes() == at::IntArrayRef({q.size(0), q.size(2), 4}),
              "range attention: ranges must be int64 (B, Lq, 4)");
}

}  // namespace

// q (B, H, Lq, D), k/v (B, Hk, Lk, D) float32 with a contiguous last dimension (H a multiple of Hk);
// ranges (B, Lq, 4) int64: row i of batch b reads keys [a0, a1) U [b0, b1), a1 <= b0 unless [a0, a1) is
// empty. Returns out (B, H, Lq, D), a view of (B, Lq, H, D) memory (the layout attention layers hand on),
// and the log-sum-exp (B, H, Lq) of the scaled scores, -inf (and out 0) for a row that reads nothing.
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& ranges, double scale, int64_t tile_rows, int64_t chunk_keys) {
  check_inputs({q, k, v}, ranges, tile_rows, chunk_keys);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Hk = k.size(1);
  const at::Tensor rg = ranges.contiguous();
  const int64_t* range_p = rg.data_ptr<int64_t>();

  at::Tensor out = at::empty({B, Lq, H, D}, q.options());
  at::Tensor lse = at::empty({B, H, Lq}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t tiles = (Lq + tile_rows - 1) / tile_rows, group = H / Hk;
  const int ldq = static_cast<int>(q.stride(2)), ldk = static_cast<int>(k.stride(2)),
            ldv = static_cast<int>(v.stride(2)), d = static_cast<int>(D);

  at::parallel_for(0, B * H * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(tile_rows * chunk_keys), acc(tile_rows * D), row_max(tile_rows), row_sum(tile_rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (H * tiles), h = task / tiles % H, r0 = task % tiles * tile_rows;
      const int64_t m = std::min(tile_rows, Lq - r0);
      const int64_t* rows = range_p + (b * Lq + r0) * 4;
      const auto spans = tile_spans(rows, m);
      std::fill(acc.begin(), acc.begin() + m * D, 0.f);
      std::fill(row_max.begin(), row_max.begin() + m, kNegInf);
      std::fill(row_sum.begin(), row_sum.begin() + m, 0.f);
      const float* q_tile = qp + b * q.stride(0) + h * q.stride(1) + r0 * q.stride(2);
      const int64_t kh = h / group;
      for (const auto& [s0, s1] : spans) {
        for (int64_t c0 = s0; c0 < s1; c0 += chunk_keys) {
          const int64_t n = std::min(chunk_keys, s1 - c0);
          const int ni = static_cast<int>(n), mi = static_cast<int>(m);
          gemm(false, true, mi, ni, d, static_cast<float>(scale), q_tile, ldq,
               kp + b * k.stride(0) + kh * k.stride(1) + c0 * k.stride(2), ldk, 0.f, scores.data(), ni);
          for (int64_t i = 0; i < m; ++i) {
            float* s = scores.data() + i * n;
            const float best = mask_row(s, n, c0, rows + i * 4);
            if (best == kNegInf) {  // nothing of this chunk for this row
              std::fill(s, s + n, 0.f);
              continue;
            }
            const float new_max = std::max(row_max[i], best);
            const float rescale = row_max[i] == kNegInf ? 0.f : std::exp(row_max[i] - new_max);
            row_sum[i] = row_sum[i] * rescale + exp_sum(s, n, new_max);
            if (rescale != 1.f) {
              float* a = acc.data() + i * D;
              for (int64_t j = 0; j < D; ++j) a[j] *= rescale;
            }
            row_max[i] = new_max;
          }
          gemm(false, false, mi, d, ni, 1.f, scores.data(), ni,
               vp + b * v.stride(0) + kh * v.stride(1) + c0 * v.stride(2), ldv, 1.f, acc.data(), d);
        }
      }
      float* o_tile = op + ((b * Lq + r0) * H + h) * D;
      float* l_tile = lp + (b * H + h) * Lq + r0;
      for (int64_t i = 0; i < m; ++i) {
        const float inv = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
        for (int64_t j = 0; j < D; ++j) o_tile[i * H * D + j] = acc[i * D + j] * inv;
        l_tile[i] = row_sum[i] > 0.f ? row_max[i] + std::log(row_sum[i]) : kNegInf;
      }
    }
  });
  return {out.transpose(1, 2), lse};
}

// Gradients of the forward above given the *final* log-sum-exp `lse` (B, H, Lq) (+inf for a row that reads
// nothing) and delta = rowsum(grad_out * out) (B, H, Lq): P = exp(S - lse) is then exact even when other
// keys (sink logits, other ring shards) share the softmax. Per chunk: dV += P^T dO, dS = P (dO V^T - delta),
// dQ += scale dS K, dK += scale dS^T Q. One task per (batch, KV head) walks all its query heads and tiles,
// so key/value gradients have a single writer. Returns dq (B, H, Lq, D), dk and dv (B, Hk, Lk, D).
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& grad_out, const at::Tensor& lse, const at::Tensor& delta,
                                 const at::Tensor& ranges, double scale, int64_t tile_rows, int64_t chunk_keys) {
  check_inputs({q, grad_out, k, v}, ranges, tile_rows, chunk_keys);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Hk = k.size(1);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "range attention: grad_out must match q");
  const at::Tensor rg = ranges.contiguous(), ls = lse.contiguous(), dl = delta.contiguous();
  TORCH_CHECK(ls.scalar_type() == at::kFloat && ls.sizes() == at::IntArrayRef({B, H, Lq}) &&
                  dl.scalar_type() == at::kFloat && dl.sizes() == ls.sizes(),
              "range attention: lse and delta must be float32 (B, H, Lq)");
  at::Tensor dq = at::zeros({B, H, Lq, D}, q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  const int64_t* range_p = rg.data_ptr<int64_t>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *gp = grad_out.data_ptr<float>(), *lp = ls.data_ptr<float>(), *dp = dl.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const int64_t tiles = (Lq + tile_rows - 1) / tile_rows, group = H / Hk;
  const int ldq = static_cast<int>(q.stride(2)), ldg = static_cast<int>(grad_out.stride(2)),
            ldk = static_cast<int>(k.stride(2)), ldv = static_cast<int>(v.stride(2)), d = static_cast<int>(D);
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(tile_rows * chunk_keys), dscores(tile_rows * chunk_keys);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hk, kh = task % Hk;
      const int64_t k_off = b * k.stride(0) + kh * k.stride(1), v_off = b * v.stride(0) + kh * v.stride(1);
      const int64_t kv_off = (b * Hk + kh) * k.size(2) * D;  // dk, dv are contiguous
      for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
        for (int64_t r0 = 0; r0 < Lq; r0 += tile_rows) {
          const int64_t m = std::min(tile_rows, Lq - r0);
          const int mi = static_cast<int>(m);
          const int64_t* rows = range_p + (b * Lq + r0) * 4;
          const float* q_tile = qp + b * q.stride(0) + h * q.stride(1) + r0 * q.stride(2);
          const float* g_tile = gp + b * grad_out.stride(0) + h * grad_out.stride(1) + r0 * grad_out.stride(2);
          const float* l_tile = lp + (b * H + h) * Lq + r0;
          const float* d_tile = dp + (b * H + h) * Lq + r0;
          float* dq_tile = dqp + ((b * H + h) * Lq + r0) * D;
          for (const auto& [s0, s1] : tile_spans(rows, m)) {
            for (int64_t c0 = s0; c0 < s1; c0 += chunk_keys) {
              const int64_t n = std::min(chunk_keys, s1 - c0);
              const int ni = static_cast<int>(n);
              gemm(false, true, mi, ni, d, sc, q_tile, ldq, kp + k_off + c0 * ldk, ldk, 0.f, probs.data(), ni);
              for (int64_t i = 0; i < m; ++i) {
                float* p = probs.data() + i * n;
                mask_row(p, n, c0, rows + i * 4);
                exp_sum(p, n, l_tile[i]);  // P = exp(S - lse): 0 where masked or the row reads nothing
              }
              gemm(false, true, mi, ni, d, 1.f, g_tile, ldg, vp + v_off + c0 * ldv, ldv, 0.f, dscores.data(), ni);
              gemm(true, false, ni, d, mi, 1.f, probs.data(), ni, g_tile, ldg, 1.f, dvp + kv_off + c0 * D, d);
              for (int64_t i = 0; i < m; ++i) {  // dS = P (dP - delta)
                const Vec row_delta(d_tile[i]);
                float* p = probs.data() + i * n;
                float* ds = dscores.data() + i * n;
                int64_t j = 0;
                for (; j + Vec::size() <= n; j += Vec::size()) {
                  (Vec::loadu(p + j) * (Vec::loadu(ds + j) - row_delta)).store(ds + j);
                }
                for (; j < n; ++j) ds[j] = p[j] * (ds[j] - d_tile[i]);
              }
              gemm(false, false, mi, d, ni, sc, dscores.data(), ni, kp + k_off + c0 * ldk, ldk, 1.f, dq_tile, d);
              gemm(true, false, ni, d, mi, sc, dscores.data(), ni, q_tile, ldq, 1.f, dkp + kv_off + c0 * D, d);
            }
          }
        }
      }
    }
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "range-bounded flash attention forward (CPU)");
  m.def("backward", &backward, "range-bounded flash attention backward (CPU)");
}
