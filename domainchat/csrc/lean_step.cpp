// One batched decode step of decoder.LeanDecoder's layers, in C++: the same ATen calls, in the same
// order and shapes as LeanDecoder._step_layers_python (so the same kernels and the same bits), without
// the Python interpreter between them, and, on bitsandbytes' 4-bit kernel, with a batch's rows in two
// halves on two threads (a row's arithmetic never depends on the other rows of its call there). The
// matrices are bitsandbytes' CPU tile layout, multiplied by its 4-bit kernel, or, on CPUs without
// AVX512-BF16, its standard layout, dequantized to the float32 values its kernel gives (by our AVX-512
// or AVX2 kernel where the CPU has one) and multiplied by at::linear, as bitsandbytes' op does for
// transformers. decoder.py builds it at start and falls back to the
// Python loop when it cannot be compiled. It owns a float32 buffer per thread and, on the standard
// layout, a helper thread for half of each product; every other tensor is the decoder's.
#include <torch/extension.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <numeric>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

using at::Tensor;

namespace {

// bitsandbytes' nf4 x bfloat16 CPU kernel (libbitsandbytes_cpu): M, N, K, x, packed weight, absmax,
// out, blocksize, x row stride, out row stride.
using Gemv = void (*)(int64_t, int64_t, int64_t, const void*, const void*, const void*, void*, int64_t,
                      int64_t, int64_t);
// bitsandbytes' nf4 -> float32 dequantize kernel for its standard layout: packed bytes, float32
// absmax, out, blocksize, rows, columns.
using Dequantize = void (*)(const void*, const void*, void*, int64_t, int64_t, int64_t);

// Our nf4 -> float32 kernels for `count` values from `packed` (two a byte, high nibble first), block
// by block: each block's 16 values are code[i] * absmax once, then looked up, so every element is the
// one float32 product bitsandbytes' kernel computes (the tests compare them). For the 135M model's 120
// matrices on one thread (measured): bitsandbytes' kernel 13.5 ms, AVX2 9.7 (two 8-entry lookups and a
// blend per 8 values), AVX-512 6.0 (one 16-entry lookup per 16 values).
using OwnDequantize = void (*)(const uint8_t* packed, const float* absmax, const float* code, float* out,
                               int64_t count, int64_t blocksize);

#if defined(__x86_64__)  // elsewhere bitsandbytes' kernel serves
__attribute__((target("avx2"))) void dequantize_nf4_avx2(const uint8_t* packed, const float* absmax,
                                                        const float* code, float* out, int64_t count,
                                                        int64_t blocksize) {
  const __m256 low_code = _mm256_loadu_ps(code), high_code = _mm256_loadu_ps(code + 8);
  const __m256i seven = _mm256_set1_epi32(7);
  const __m128i nibble = _mm_set1_epi8(15);
  for (int64_t block = 0; block < count / blocksize; ++block) {
    const __m256 scale = _mm256_set1_ps(absmax[block]);
    const __m256 low = _mm256_mul_ps(low_code, scale), high = _mm256_mul_ps(high_code, scale);
    for (int64_t j = 0; j < blocksize; j += 16) {
      const int64_t e = block * blocksize + j;
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + e / 2));
      const __m128i ordered = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble),
                                                _mm_and_si128(bytes, nibble));
      for (int half = 0; half < 2; ++half) {
        const __m256i index = _mm256_cvtepu8_epi32(half == 0 ? ordered : _mm_srli_si128(ordered, 8));
        const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(index, seven));
        _mm256_storeu_ps(out + e + 8 * half, _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, index),
                                                              _mm256_permutevar8x32_ps(high, index), upper));
      }
    }
  }
}

__attribute__((target("avx512f"))) void dequantize_nf4_avx512(const uint8_t* packed, const float* absmax,
                                                             const float* code, float* out, int64_t count,
                                                             int64_t blocksize) {
  const __m512 codes = _mm512_loadu_ps(code);
  const __m128i nibble = _mm_set1_epi8(15);
  for (int64_t block = 0; block < count / blocksize; ++block) {
    const __m512 table = _mm512_mul_ps(codes, _mm512_set1_ps(absmax[block]));
    for (int64_t j = 0; j < blocksize; j += 32) {
      const int64_t e = block * blocksize + j;
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + e / 2));
      const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), low = _mm_and_si128(bytes, nibble);
      _mm512_storeu_ps(out + e, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(high, low)), table));
      _mm512_storeu_ps(out + e + 16,
                       _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(high, low)), table));
    }
  }
}
#endif

// The widest of our kernels that this CPU runs, `blocksize` suits and `isa` allows ("avx512",
// "avx2"; "" for the widest), or nullptr (bitsandbytes' kernel then). ATEN_CPU_CAPABILITY=avx2 (or
// default), which holds ATen to narrower kernels, holds ours too, so one setting imitates a narrower CPU.
OwnDequantize own_dequantize_kernel(int64_t blocksize, int64_t codes, const std::string& isa) {
#if defined(__x86_64__)
  const char* capability = std::getenv("ATEN_CPU_CAPABILITY");
  const std::string aten = capability == nullptr ? "" : capability;
  if (codes != 16 || aten == "default") return nullptr;
  if ((isa.empty() || isa == "avx512") && aten != "avx2" && blocksize % 32 == 0 &&
      __builtin_cpu_supports("avx512f"))
    return dequantize_nf4_avx512;
  if ((isa.empty() || isa == "avx2") && blocksize % 16 == 0 && __builtin_cpu_supports("avx2"))
    return dequantize_nf4_avx2;
#endif
  return nullptr;
}

// nf4 packed bytes -> float32 [count] through own_dequantize_kernel(blocksize, 16, isa), so that the
// tests can hold each kernel against bitsandbytes'; an error where no kernel of ours fits.
Tensor dequantize_nf4(const Tensor& packed, const Tensor& absmax, const Tensor& code, int64_t count,
                      int64_t blocksize, const std::string& isa) {
  const OwnDequantize kernel = own_dequantize_kernel(blocksize, code.numel(), isa);
  TORCH_CHECK(kernel != nullptr, "no nf4 dequantize kernel of ours for '", isa, "' on this CPU");
  TORCH_CHECK(packed.is_contiguous() && absmax.is_contiguous() && packed.numel() * 2 >= count &&
                  absmax.numel() * blocksize >= count && count % blocksize == 0,
              "packed bytes and block scales for `count` values, whole blocks");
  Tensor out = at::empty({count}, absmax.options().dtype(at::kFloat));
  const Tensor codes = code.to(at::kFloat).contiguous(), scales = absmax.to(at::kFloat).contiguous();
  kernel(static_cast<const uint8_t*>(packed.data_ptr()), scales.data_ptr<float>(), codes.data_ptr<float>(),
         out.data_ptr<float>(), count, blocksize);
  return out;
}

struct Linear {  // a fused matrix: bitsandbytes' packed nf4 (either layout) with its absmax
  Tensor packed;
  Tensor absmax;
  int64_t n;
  int64_t k;
  std::vector<int64_t> splits;
  int64_t half = 0;  // standard layout: the row where a product's second thread starts (0: one thread)
};

// A second thread that runs one job at a time for the caller, which waits for it: the other half of
// each dequantized product. Posting 120 jobs a step through OpenMP or a new thread costs a wake-up
// each (tens of microseconds, more than a half product saves), so it spins a while between jobs
// and sleeps only when none came for kIdle (between steps, leaving the core to the server).
class Helper {
 public:
  Helper() : thread_([this] { loop(); }) {}
  ~Helper() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_one();
    thread_.join();
  }

  // Runs `job` on the helper while the caller runs `mine`, then waits for both (rethrows either's error).
  void together(const std::function<void()>& job, const std::function<void()>& mine) {
    job_ = &job;
    failure_ = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      posted_.store(true, std::memory_order_release);
    }
    wake_.notify_one();
    std::exception_ptr own;
    try {
      mine();
    } catch (...) {
      own = std::current_exception();
    }
    while (posted_.load(std::memory_order_acquire)) std::this_thread::yield();
    if (own) std::rethrow_exception(own);
    if (failure_) std::rethrow_exception(failure_);
  }

 private:
  static constexpr auto kIdle = std::chrono::microseconds(500);

  void loop() {
    at::set_num_threads(1);
    while (true) {
      auto spun_since = std::chrono::steady_clock::now();
      while (!posted_.load(std::memory_order_acquire)) {
        if (std::chrono::steady_clock::now() - spun_since < kIdle) continue;
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return stop_ || posted_.load(std::memory_order_acquire); });
        if (stop_) return;
      }
      try {
        (*job_)();
      } catch (...) {
        failure_ = std::current_exception();
      }
      posted_.store(false, std::memory_order_release);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::atomic<bool> posted_{false};
  const std::function<void()>* job_ = nullptr;
  std::exception_ptr failure_;
  std::thread thread_;  // last: started once the members above exist
};

struct Stack {  // one fused matrix's LoRA for the rows of a batch (see LeanDecoder._stacks)
  bool present = false;
  Tensor a;                   // [rows, R, K]
  std::vector<Tensor> b;      // each [rows, N_i, r_i]
  std::vector<Tensor> scale;  // each [rows, 1, 1]
  bool prescale = false;
};

class LeanStep {
 public:
  LeanStep(Tensor embed, Tensor final_norm, std::vector<Tensor> input_norms, std::vector<Tensor> post_norms,
           std::vector<Tensor> packed, std::vector<Tensor> absmax, std::vector<std::vector<int64_t>> shapes,
           std::vector<std::vector<int64_t>> splits, int64_t blocksize, int64_t gemv_address,
           int64_t dequantize_address, Tensor code, int64_t heads,
           int64_t kv_heads, int64_t head_dim, double scaling, double eps, Tensor cos, Tensor sin)
      : embed_(std::move(embed)),
        final_norm_(std::move(final_norm)),
        input_norms_(std::move(input_norms)),
        post_norms_(std::move(post_norms)),
        blocksize_(blocksize),
        gemv_(reinterpret_cast<Gemv>(gemv_address)),
        dequantize_(reinterpret_cast<Dequantize>(dequantize_address)),
        code_(code.to(at::kFloat).contiguous()),
        heads_(heads),
        kv_heads_(kv_heads),
        head_dim_(head_dim),
        scaling_(scaling),
        eps_(eps),
        cos_(std::move(cos)),
        sin_(std::move(sin)) {
    TORCH_CHECK(packed.size() == absmax.size() && packed.size() == shapes.size() && packed.size() == splits.size(),
                "one packed weight, absmax, shape and split list per matrix");
    TORCH_CHECK(packed.size() == 4 * input_norms_.size(), "four matrices per layer");
    TORCH_CHECK((gemv_ == nullptr) != (dequantize_ == nullptr), "either the 4-bit kernel or the dequantize kernel");
    if (dequantize_ != nullptr) own_dequantize_ = own_dequantize_kernel(blocksize_, code_.numel(), "");
    for (size_t i = 0; i < packed.size(); ++i) {
      linears_.push_back(Linear{packed[i], absmax[i], shapes[i][0], shapes[i][1], splits[i]});
      if (dequantize_ != nullptr) linears_.back().half = half_row(shapes[i][0], shapes[i][1]);
    }
    stacks_.resize(packed.size());
  }

  // The rows' LoRA stacks, four per layer (qkv, o, gate_up, down); `a` undefined where none.
  void set_stacks(std::vector<std::optional<Tensor>> a, std::vector<std::vector<Tensor>> b,
                  std::vector<std::vector<Tensor>> scale, std::vector<bool> prescale) {
    TORCH_CHECK(a.size() == stacks_.size(), "one stack per matrix");
    for (size_t i = 0; i < stacks_.size(); ++i) {
      Stack s;
      s.present = a[i].has_value();
      if (s.present) {
        s.a = *a[i];
        s.b = b[i];
        s.scale = scale[i];
        s.prescale = prescale[i];
      }
      stacks_[i] = std::move(s);
    }
  }

  // Final-normed hidden states [rows, H] after one new token per row; writes each row's key and
  // value at position lengths[row] of its cache (the caller advances the lengths). With `split`
  // and two rows or more, the rows' second half runs on a second thread: rows never mix, and each
  // kernel computes a row alike whatever other rows share its call.
  // On the standard layout `split` instead runs each product's second half of the matrix's rows on a
  // helper thread: the rows of a batch share every product there, and a float32 product's output
  // columns do not depend on the others in the call (the tests compare against whole products).
  Tensor step(const Tensor& tokens, const Tensor& positions, const std::vector<Tensor>& keys,
              const std::vector<Tensor>& values, const std::vector<int64_t>& lengths, bool split) {
    const int64_t rows = tokens.size(0);
    if (dequantize_ != nullptr) {
      if (split && !helper_) helper_ = std::make_unique<Helper>();
      halves_ = split;
      return step_rows(tokens, positions, keys, values, lengths, 0);
    }
    if (!split || rows < 2) return step_rows(tokens, positions, keys, values, lengths, 0);
    const int64_t half = (rows + 1) / 2;
    const bool inference = c10::InferenceMode::is_enabled();
    const bool grad = at::GradMode::is_enabled();
    Tensor second;
    std::exception_ptr failure;
    std::thread worker([&] {
      try {
        c10::InferenceMode inference_guard(inference);
        at::AutoGradMode grad_guard(grad);
        at::set_num_threads(1);
        second = step_rows(tokens.slice(0, half), positions.slice(0, half),
                           std::vector<Tensor>(keys.begin() + half, keys.end()),
                           std::vector<Tensor>(values.begin() + half, values.end()),
                           std::vector<int64_t>(lengths.begin() + half, lengths.end()), half);
      } catch (...) {
        failure = std::current_exception();
      }
    });
    Tensor first;
    try {
      first = step_rows(tokens.slice(0, 0, half), positions.slice(0, 0, half),
                        std::vector<Tensor>(keys.begin(), keys.begin() + half),
                        std::vector<Tensor>(values.begin(), values.begin() + half),
                        std::vector<int64_t>(lengths.begin(), lengths.begin() + half), 0);
    } catch (...) {
      worker.join();
      throw;
    }
    worker.join();
    if (failure) std::rethrow_exception(failure);
    return at::cat({first, second});
  }

  // Each matrix's split row for two threads on the standard layout (0: one thread; all 0 on the tile layout).
  std::vector<int64_t> halves() const {
    std::vector<int64_t> rows;
    for (const Linear& w : linears_) rows.push_back(w.half);
    return rows;
  }

 private:
  // Rows [first_row, first_row + tokens.size(0)) of the batch whose LoRA stacks were set.
  Tensor step_rows(const Tensor& tokens, const Tensor& positions, const std::vector<Tensor>& keys,
                   const std::vector<Tensor>& values, const std::vector<int64_t>& lengths, int64_t first_row) {
    const int64_t rows = tokens.size(0);
    Tensor cos = cos_.index({positions}).unsqueeze(1);
    Tensor sin = sin_.index({positions}).unsqueeze(1);
    Tensor h = embed_.index({tokens});
    const int64_t layers = static_cast<int64_t>(input_norms_.size());
    for (int64_t index = 0; index < layers; ++index) {
      const Linear& qkv_w = linears_[4 * index];
      const Linear& o_w = linears_[4 * index + 1];
      const Linear& gate_up_w = linears_[4 * index + 2];
      const Linear& down_w = linears_[4 * index + 3];
      Tensor x = norm(h, input_norms_[index]);
      auto qkv = add_lora_rows(gemv(x, qkv_w), x, stacks_[4 * index], first_row).split_with_sizes(qkv_w.splits, -1);
      Tensor q = rotate(qkv[0].view({rows, heads_, head_dim_}), cos, sin);
      Tensor k = rotate(qkv[1].view({rows, kv_heads_, head_dim_}), cos, sin);
      Tensor v = qkv[2].view({rows, kv_heads_, head_dim_});
      std::vector<Tensor> attended;
      attended.reserve(rows);
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t length = lengths[row];
        Tensor layer_keys = keys[row].select(0, index);
        Tensor layer_values = values[row].select(0, index);
        layer_keys.select(1, length).copy_(k.select(0, row));
        layer_values.select(1, length).copy_(v.select(0, row));
        attended.push_back(at::scaled_dot_product_attention(
                               q.select(0, row).unsqueeze(0).unsqueeze(2),
                               layer_keys.slice(1, 0, length + 1).unsqueeze(0),
                               layer_values.slice(1, 0, length + 1).unsqueeze(0), std::nullopt, 0.0, false,
                               scaling_, true)
                               .reshape({1, -1}));
      }
      Tensor joined = at::cat(attended);
      h.add_(add_lora_rows(gemv(joined, o_w), joined, stacks_[4 * index + 1], first_row));
      x = norm(h, post_norms_[index]);
      auto gate_up = add_lora_rows(gemv(x, gate_up_w), x, stacks_[4 * index + 2], first_row).split_with_sizes(
          gate_up_w.splits, -1);
      Tensor act = at::silu(gate_up[0]) * gate_up[1];
      h.add_(add_lora_rows(gemv(act, down_w), act, stacks_[4 * index + 3], first_row));
    }
    return norm(h, final_norm_);
  }

  Tensor norm(const Tensor& h, const Tensor& weight) const {
    return weight * (h * at::rsqrt(h.pow(2).mean(-1, true) + eps_));
  }

  static Tensor rotate(const Tensor& x, const Tensor& cos, const Tensor& sin) {
    const int64_t half = x.size(-1) / 2;
    return x * cos + at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1) * sin;
  }

  // decoder.FusedLinear.gemv (bitsandbytes' kernel) or, without one (CPUs without AVX512-BF16),
  // DequantizedLinear.gemv, in two halves of the matrix's rows on two threads when halves_.
  Tensor gemv(const Tensor& x, const Linear& w) const {
    if (gemv_ == nullptr) {
      Tensor out = at::empty({x.size(0), w.n}, x.options());
      if (!halves_ || w.half == 0) {
        dequantized_product(x, w, 0, w.n, out);
        return out;
      }
      const bool inference = c10::InferenceMode::is_enabled();
      helper_->together(
          [&] {
            c10::InferenceMode inference_guard(inference);
            dequantized_product(x, w, w.half, w.n, out);
          },
          [&] { dequantized_product(x, w, 0, w.half, out); });
      return out;
    }
    Tensor rows = x.to(at::kBFloat16).contiguous();
    Tensor out = at::empty({rows.size(0), w.n}, rows.options());
    gemv_(rows.size(0), w.n, w.k, rows.data_ptr(), w.packed.data_ptr(), w.absmax.data_ptr(), out.data_ptr(),
          blocksize_, rows.stride(0), out.stride(0));
    return out.to(at::kFloat);
  }

  // Rows [begin, end) of the matrix dequantized into this thread's buffer (64-byte aligned by torch's
  // allocator, as the op's fresh tensor is), then x times them into those columns of `out`: the
  // product at::linear computes (at::mm writes a row-major slice in place, through its row stride).
  void dequantized_product(const Tensor& x, const Linear& w, int64_t begin, int64_t end, Tensor& out) const {
    thread_local Tensor buffer;
    const int64_t count = (end - begin) * w.k;
    if (!buffer.defined() || buffer.numel() < count) buffer = at::empty({count}, x.options());
    Tensor weight = buffer.slice(0, 0, count).view({end - begin, w.k});
    const auto* packed = static_cast<const uint8_t*>(w.packed.data_ptr()) + begin * w.k / 2;
    const auto* absmax = static_cast<const float*>(w.absmax.data_ptr()) + begin * w.k / blocksize_;
    if (own_dequantize_ != nullptr)
      own_dequantize_(packed, absmax, code_.data_ptr<float>(), weight.data_ptr<float>(), count, blocksize_);
    else
      dequantize_(packed, absmax, weight.data_ptr(), blocksize_, end - begin, w.k);
    Tensor columns = out.slice(1, begin, end);
    at::mm_out(columns, x, weight.t());
  }

  // Where a matrix of n rows of k splits for two threads: near the middle, on a row that starts a
  // quantization block and a 64-byte line, and leaves both halves a multiple of 8 rows (the BLAS sums
  // a remainder of rows in another order). 0 where no such row is.
  int64_t half_row(int64_t n, int64_t k) const {
    int64_t unit = std::lcm<int64_t>(8, blocksize_ / std::gcd(k, blocksize_));
    unit = std::lcm<int64_t>(unit, 16 / std::gcd<int64_t>(k, 16));
    if (n % 8 != 0) return 0;
    const int64_t half = n / 2 / unit * unit;
    return half > 0 && half < n ? half : 0;
  }

  // The stacks hold every row of the batch; `first_row` and x's rows say which are computed here.
  static Tensor add_lora_rows(Tensor out, const Tensor& x, const Stack& stack, int64_t first_row) {
    if (!stack.present) return out;
    const int64_t rows = x.size(0);
    auto mine = [&](const Tensor& t) { return t.size(0) == 1 ? t : t.slice(0, first_row, first_row + rows); };
    Tensor h = at::bmm(x.unsqueeze(1), mine(stack.a).transpose(1, 2));
    int64_t rank_start = 0, column = 0;
    for (size_t i = 0; i < stack.b.size(); ++i) {
      const Tensor b = mine(stack.b[i]);
      const Tensor scale = mine(stack.scale[i]);
      const int64_t rank = b.size(2), width = b.size(1);
      Tensor part = h.slice(2, rank_start, rank_start + rank);
      Tensor delta = stack.prescale ? at::bmm(part * scale, b.transpose(1, 2))
                                    : at::bmm(part, b.transpose(1, 2)) * scale;
      out.slice(1, column, column + width).add_(delta.squeeze(1));
      rank_start += rank;
      column += width;
    }
    return out;
  }

  Tensor embed_, final_norm_;
  std::vector<Tensor> input_norms_, post_norms_;
  std::vector<Linear> linears_;  // four per layer: qkv, o, gate_up, down
  std::vector<Stack> stacks_;
  int64_t blocksize_;
  Gemv gemv_;              // nullptr: the standard layout, through dequantize_
  Dequantize dequantize_;  // nullptr: the tile layout, through gemv_
  Tensor code_;                   // the 16 nf4 values
  OwnDequantize own_dequantize_ = nullptr;  // ours where one fits, else dequantize_
  std::unique_ptr<Helper> helper_;  // the second thread of dequantized products, made at the first split
  bool halves_ = false;             // this step splits dequantized products
  int64_t heads_, kv_heads_, head_dim_;
  double scaling_, eps_;
  Tensor cos_, sin_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_nf4", &dequantize_nf4, py::arg("packed"), py::arg("absmax"), py::arg("code"), py::arg("count"),
        py::arg("blocksize"), py::arg("isa") = "");
  py::class_<LeanStep>(m, "LeanStep")
      .def(py::init<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                    std::vector<std::vector<int64_t>>, std::vector<std::vector<int64_t>>, int64_t, int64_t, int64_t,
                    Tensor, int64_t, int64_t, int64_t, double, double, Tensor, Tensor>())
      .def("set_stacks", &LeanStep::set_stacks)
      .def("halves", &LeanStep::halves)
      .def("step", &LeanStep::step, py::call_guard<py::gil_scoped_release>());
}
