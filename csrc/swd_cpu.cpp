// CPU kernels of snap_fast's sliced-Wasserstein regularizer (Python face: snap_fast/ops/swd/cpp.py).
//
// Every op works on a flat float32 buffer cut into segments by an int64 offset table
// (snap_fast/layout.py): segment s is x[offsets[s] : offsets[s+1]], one 1-D sorting problem.
// Work is spread over threads with at::parallel_for on chunks of whole segments balanced by
// element count, so a model's 27 000 segments cost one call and no Python per segment.
//
// Sorting uses order-preserving uint32 keys of the float bits (negative floats flipped, positive
// ones get the sign bit set). Comparisons are integer comparisons, so NaN inputs are sorted like
// any other bit pattern (positive NaN after +inf, negative NaN before -inf): no undefined
// behaviour, and the NaN reaches the result, making the regularizer value non-finite.

// Narrow includes instead of <torch/extension.h>: they cut the first-use compile time by ~4x.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/addmm.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline uint32_t float_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float key_float(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Items are either bare keys (uint32) or (key << 32 | index) pairs (uint64); the key is what
// every sort orders by, ties keep any order.
inline uint32_t key_of(uint32_t item) { return item; }
inline uint32_t key_of(uint64_t item) { return static_cast<uint32_t>(item >> 32); }

// Below this length an insertion sort beats the histogram set-up of a radix sort.
constexpr int64_t kInsertionMax = 48;
// Below this length 8-bit digits (4 passes, 256 buckets) beat 11-bit digits (3 passes, 2048).
constexpr int64_t kSmallRadixMax = 4096;

template <typename T>
void insertion_sort(T* a, int64_t n) {
  for (int64_t i = 1; i < n; ++i) {
    const T v = a[i];
    const uint32_t k = key_of(v);
    int64_t j = i;
    while (j > 0 && key_of(a[j - 1]) > k) {
      a[j] = a[j - 1];
      --j;
    }
    a[j] = v;
  }
}

// Insertion sort that gives up after `budget` element moves: cheap when the input is nearly
// sorted (cost = n + inversions), bounded when it is not. Returns false when it gave up; `a` is
// then still a permutation of the input.
template <typename T>
bool insertion_sort_bounded(T* a, int64_t n, int64_t budget) {
  for (int64_t i = 1; i < n; ++i) {
    const T v = a[i];
    const uint32_t k = key_of(v);
    if (key_of(a[i - 1]) <= k) continue;
    int64_t j = i;
    while (j > 0 && key_of(a[j - 1]) > k) {
      a[j] = a[j - 1];
      --j;
    }
    a[j] = v;
    budget -= i - j;
    if (budget < 0) return false;
  }
  return true;
}

// LSD radix sort on the 32-bit key, PASSES digits of BITS bits; `tmp` has room for n items.
// All digit histograms come from one read pass; a digit that is equal for every item is skipped.
template <typename T, int BITS, int PASSES>
void radix_sort(T* a, T* tmp, int64_t n) {
  static_assert(BITS * PASSES >= 32, "digits must cover the 32-bit key");
  constexpr uint32_t B = 1u << BITS;
  constexpr uint32_t M = B - 1;
  std::vector<uint32_t> hist_storage(static_cast<size_t>(PASSES) * B, 0);
  uint32_t* hist = hist_storage.data();
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = key_of(a[i]);
    for (int p = 0; p < PASSES; ++p) ++hist[p * B + ((k >> (p * BITS)) & M)];
  }
  T* src = a;
  T* dst = tmp;
  for (int p = 0; p < PASSES; ++p) {
    uint32_t* h = hist + p * B;
    const int shift = p * BITS;
    if (h[(key_of(src[0]) >> shift) & M] == static_cast<uint32_t>(n)) continue;
    uint32_t sum = 0;
    for (uint32_t b = 0; b < B; ++b) {
      const uint32_t c = h[b];
      h[b] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const T v = src[i];
      dst[h[(key_of(v) >> shift) & M]++] = v;
    }
    std::swap(src, dst);
  }
  if (src != a) std::memcpy(a, src, static_cast<size_t>(n) * sizeof(T));
}

template <typename T>
void sort_items(T* a, T* tmp, int64_t n) {
  if (n <= kInsertionMax) {
    insertion_sort(a, n);
  } else if (n <= kSmallRadixMax) {
    radix_sort<T, 8, 4>(a, tmp, n);
  } else {
    radix_sort<T, 11, 3>(a, tmp, n);
  }
}

// Prefetches the cache lines of a[begin, end) (64-byte lines) into all cache levels.
// A hint only: compilers without __builtin_prefetch skip it.
template <typename T>
inline void prefetch_range(const T* a, int64_t begin, int64_t end, bool write) {
#if defined(__GNUC__) || defined(__clang__)
  constexpr int64_t step = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t i = begin; i < end; i += step) {
    if (write) {
      __builtin_prefetch(a + i, 1, 3);
    } else {
      __builtin_prefetch(a + i, 0, 3);
    }
  }
#else
  (void)a, (void)begin, (void)end, (void)write;
#endif
}

// Per-thread scratch, grown to the longest segment a thread meets.
template <typename T>
T* scratch(std::vector<T>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

void check_offsets(const at::Tensor& offsets, int64_t total, const char* buffer_name) {
  TORCH_CHECK(offsets.device().is_cpu(), "offsets must be a CPU tensor");
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, "offsets must be 1-D and non-empty");
  TORCH_CHECK(offsets.is_contiguous(), "offsets must be contiguous");
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t s = offsets.numel() - 1;
  TORCH_CHECK(o[0] == 0, "offsets[0] must be 0, got ", o[0]);
  TORCH_CHECK(o[s] == total, "offsets[-1] = ", o[s], " does not match the length ", total, " of ",
              buffer_name);
  for (int64_t i = 0; i < s; ++i) {
    TORCH_CHECK(o[i + 1] > o[i], "segment ", i, " is empty or offsets are not increasing");
    TORCH_CHECK(o[i + 1] - o[i] <= INT32_MAX, "segment ", i, " is longer than 2^31 - 1");
  }
}

void check_flat(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got ", t.dim(), " dimensions");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The caller's output buffer (a flat float32 tensor as long as `like`), or a new one like `like`.
at::Tensor out_or_new(const c10::optional<at::Tensor>& out, const char* name, const at::Tensor& like,
                      const char* like_name) {
  if (!out.has_value() || !out->defined()) return at::empty_like(like);
  check_flat(*out, name);
  TORCH_CHECK(out->numel() == like.numel(), name, " has ", out->numel(), " elements, ", like_name, " has ",
              like.numel());
  return *out;
}

// Contiguous ranges of whole segments with about equal element counts, so threads stay busy even
// when one tensor's segments (the embedding's) hold a quarter of all values.
std::vector<int64_t> balanced_chunks(const int64_t* o, int64_t num_segments) {
  const int64_t total = o[num_segments];
  const int64_t target_chunks = std::max<int64_t>(1, at::get_num_threads()) * 16;
  const int64_t target = std::max<int64_t>(1, (total + target_chunks - 1) / target_chunks);
  std::vector<int64_t> bounds{0};
  int64_t acc = 0;
  for (int64_t s = 0; s < num_segments; ++s) {
    acc += o[s + 1] - o[s];
    if (acc >= target) {
      bounds.push_back(s + 1);
      acc = 0;
    }
  }
  if (bounds.back() != num_segments) bounds.push_back(num_segments);
  return bounds;
}

template <typename F>
void for_each_segment(const at::Tensor& offsets, F&& f) {
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t num_segments = offsets.numel() - 1;
  const std::vector<int64_t> bounds = balanced_chunks(o, num_segments);
  const int64_t nchunks = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t s = bounds[c]; s < bounds[c + 1]; ++s) f(s, o[s], o[s + 1] - o[s]);
    }
  });
}

// Outcome counters of the permutation-reuse path, per call.
struct ReuseStats {
  std::atomic<int64_t> already_sorted{0};  // previous permutation still sorts the segment
  std::atomic<int64_t> repaired{0};        // fixed by the bounded insertion sort
  std::atomic<int64_t> resorted{0};        // full sort (no previous permutation, or too disordered)

  at::Tensor to_tensor() const {
    at::Tensor counts = at::empty({3}, at::kLong);
    int64_t* c = counts.data_ptr<int64_t>();
    c[0] = already_sorted.load();
    c[1] = repaired.load();
    c[2] = resorted.load();
    return counts;
  }
};

// Each descent needs at least one move; this many mean the order changed a lot, and a full sort
// is cheaper than a repair.
inline bool too_disordered(int64_t descents, int64_t n) { return descents * 8 >= n; }
// Passes through a kept order check too_disordered every this many elements and stop once it holds.
constexpr int64_t kDisorderCheckBlock = 256;

// Moves the bounded insertion sort may spend per element before a full radix sort is cheaper.
constexpr int64_t kRepairMovesPerElement = 4;

// Sorts (key, index) items of one segment, reusing `perm` (the previous sorting permutation of
// this segment) when `reuse` is set. On return items[k] holds the k-th smallest key and the
// segment-local index it came from.
// `x(i)` returns the segment's i-th projected value (the fused path adds a constant offset there).
// A kept order that shows too many descents (too_disordered) is dropped at the end of the block
// that shows it, and the segment is sorted from its natural order.
// Returns true when the previous permutation still sorts the segment (then `perm` needs no update).
template <typename Load>
bool sort_segment_pairs(const Load& x, int64_t n, const int32_t* perm, bool reuse, uint64_t* items,
                        uint64_t* tmp, ReuseStats& stats) {
  if (reuse) {
    int64_t descents = 0;
    uint32_t prev = 0;
    bool gathered = true;
    for (int64_t k = 0; k < n; ++k) {
      const uint32_t idx = static_cast<uint32_t>(perm[k]);
      const uint32_t key = float_key(x(idx));
      descents += key < prev;
      prev = key;
      items[k] = (static_cast<uint64_t>(key) << 32) | idx;
      if ((k + 1) % kDisorderCheckBlock == 0 && too_disordered(descents, n)) {
        gathered = false;  // no repair will follow: stop gathering through the old order
        break;
      }
    }
    if (gathered) {
      if (descents == 0) {
        stats.already_sorted.fetch_add(1, std::memory_order_relaxed);
        return true;
      }
      if (!too_disordered(descents, n) &&
          insertion_sort_bounded(items, n, kRepairMovesPerElement * n + kInsertionMax)) {
        stats.repaired.fetch_add(1, std::memory_order_relaxed);
        return false;
      }
      sort_items(items, tmp, n);  // items is still a permutation of the segment: sort it fully
      stats.resorted.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    items[k] = (static_cast<uint64_t>(float_key(x(k))) << 32) | static_cast<uint32_t>(k);
  }
  sort_items(items, tmp, n);
  stats.resorted.fetch_add(1, std::memory_order_relaxed);
  return false;
}

void check_perm(const at::Tensor& perm, int64_t total) {
  TORCH_CHECK(perm.device().is_cpu(), "perm must be a CPU tensor");
  TORCH_CHECK(perm.scalar_type() == at::kInt, "perm must be int32, got ", perm.scalar_type());
  TORCH_CHECK(perm.dim() == 1 && perm.numel() == total && perm.is_contiguous(),
              "perm must be a contiguous 1-D tensor of length ", total);
}

// Checks that a kept permutation is a valid index set per segment (indices in range); a bad
// index would read out of bounds. Duplicates cannot occur: perm is only written by this file.
void check_perm_range(const int32_t* perm, const at::Tensor& offsets) {
  std::atomic<bool> ok{true};
  for_each_segment(offsets, [&](int64_t, int64_t start, int64_t n) {
    const int32_t* p = perm + start;
    for (int64_t k = 0; k < n; ++k) {
      if (p[k] < 0 || p[k] >= n) {
        ok.store(false, std::memory_order_relaxed);
        return;
      }
    }
  });
  TORCH_CHECK(ok.load(), "perm holds an index outside its segment: it is not a kept permutation");
}

// ------------------------------------------------------------------------------------------
// The sorted reference (and the fused path's offset, and the sort's input and output) may be
// float32 or bfloat16: the regularizer keeps its cache in bfloat16 by default, and converting it on
// the fly here is free next to the sort, whereas a full-buffer conversion in Python costs a pass
// over tens of millions of values.
void check_ref(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got ", t.dim(), " dimensions");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == numel, name, " has ", t.numel(), " elements, expected ", numel);
}

// Calls f(pointer) with the typed data pointer of a float32 or bfloat16 tensor.
template <typename F>
void with_ref(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kBFloat16) {
    f(t.data_ptr<at::BFloat16>());
  } else {
    f(t.data_ptr<float>());
  }
}

// Sorts the n values of `in` into `values` (ascending) and writes their segment-local indices to
// `order` (order[k] = index of the k-th smallest), through thread-local (key, index) items.
template <typename InT, typename OutT>
void sort_with_order(const InT* in, int64_t n, OutT* values, int32_t* order) {
  thread_local std::vector<uint64_t> items_buf, tmp_buf;
  uint64_t* items = scratch(items_buf, n);
  for (int64_t k = 0; k < n; ++k) {
    items[k] = (static_cast<uint64_t>(float_key(static_cast<float>(in[k]))) << 32) | static_cast<uint32_t>(k);
  }
  sort_items(items, scratch(tmp_buf, n), n);
  for (int64_t k = 0; k < n; ++k) {
    values[k] = static_cast<OutT>(key_float(static_cast<uint32_t>(items[k] >> 32)));
    order[k] = static_cast<int32_t>(static_cast<uint32_t>(items[k]));
  }
}

// sort_segments: ascending sort of every segment (keys only, values rebuilt from the keys).
// `x` and `out` may each be float32 or bfloat16 (refresh sorts its bf16 cache of W0 Θ as stored);
// `out` (optional, else a new float32 buffer) receives the result and may be `x` itself: each
// segment is read whole before it is written. `perm` (optional, int32 like x) receives each
// segment's sorting permutation, perm[start + k] = the segment-local index of the k-th smallest
// value: the next fused forward starts from it (W Θ nearly keeps the order of W0 Θ along the same
// directions).
at::Tensor sort_segments(const at::Tensor& x, const at::Tensor& offsets, const c10::optional<at::Tensor>& out_opt,
                         const c10::optional<at::Tensor>& perm_opt) {
  check_ref(x, "x", x.numel());
  check_offsets(offsets, x.numel(), "x");
  at::Tensor out;
  if (out_opt.has_value() && out_opt->defined()) {
    check_ref(*out_opt, "out", x.numel());
    out = *out_opt;
  } else {
    out = at::empty({x.numel()}, x.options().dtype(at::kFloat));
  }
  int32_t* pm = nullptr;
  if (perm_opt.has_value() && perm_opt->defined()) {
    check_perm(*perm_opt, x.numel());
    pm = perm_opt->data_ptr<int32_t>();
  }
  with_ref(x, [&](const auto* in) {
    with_ref(out, [&](auto* res) {
      using OutT = std::remove_pointer_t<std::remove_const_t<decltype(res)>>;
      for_each_segment(offsets, [&](int64_t, int64_t start, int64_t n) {
        if (pm != nullptr) {
          sort_with_order(in + start, n, res + start, pm + start);
          return;
        }
        thread_local std::vector<uint32_t> keys_buf, tmp_buf;
        uint32_t* keys = scratch(keys_buf, n);
        uint32_t* tmp = scratch(tmp_buf, n);
        for (int64_t k = 0; k < n; ++k) keys[k] = float_key(static_cast<float>(in[start + k]));
        sort_items(keys, tmp, n);
        for (int64_t k = 0; k < n; ++k) res[start + k] = static_cast<OutT>(key_float(keys[k]));
      });
    });
  });
  return out;
}

// `check_range`: validate a reused permutation's indices up front (a caller that validates them
// while reading, as the fused forward does, passes false and saves a pass over the buffer).
int32_t* prepare_perm(const c10::optional<at::Tensor>& perm, bool reuse, const at::Tensor& offsets,
                      int64_t total, bool check_range = true) {
  const bool keep = perm.has_value() && perm->defined();
  TORCH_CHECK(keep || !reuse, "reuse=True needs a perm buffer");
  if (!keep) return nullptr;
  check_perm(*perm, total);
  int32_t* pm = perm->data_ptr<int32_t>();
  if (reuse && check_range) check_perm_range(pm, offsets);
  return pm;
}

// ------------------------------------------------------------------------------------------
// match_sorted: T[perm[k]] = ref[k] per segment, perm sorting proj. When `perm` is defined it
// receives the permutations; with `reuse` it also holds the previous call's permutations, which
// seed the sort. Returns (T, stats) with stats = int64 [already_sorted, repaired, resorted].
std::tuple<at::Tensor, at::Tensor> match_sorted(const at::Tensor& proj, const at::Tensor& sorted_ref,
                                                const at::Tensor& offsets, const c10::optional<at::Tensor>& perm,
                                                bool reuse) {
  check_flat(proj, "proj");
  check_ref(sorted_ref, "sorted_ref", proj.numel());
  check_offsets(offsets, proj.numel(), "proj");
  int32_t* pm = prepare_perm(perm, reuse, offsets, proj.numel());
  const bool keep = pm != nullptr;
  at::Tensor out = at::empty_like(proj);
  const float* x = proj.data_ptr<float>();
  float* t = out.data_ptr<float>();
  ReuseStats stats;
  with_ref(sorted_ref, [&](const auto* ref) {
    for_each_segment(offsets, [&](int64_t, int64_t start, int64_t n) {
      thread_local std::vector<uint64_t> items_buf, tmp_buf;
      uint64_t* items = scratch(items_buf, n);
      uint64_t* tmp = scratch(tmp_buf, n);
      const float* xs = x + start;
      sort_segment_pairs([xs](int64_t i) { return xs[i]; }, n, keep ? pm + start : nullptr, reuse, items, tmp,
                         stats);
      for (int64_t k = 0; k < n; ++k) {
        const uint32_t idx = static_cast<uint32_t>(items[k]);
        t[start + idx] = static_cast<float>(ref[start + k]);
        if (keep) pm[start + k] = static_cast<int32_t>(idx);
      }
    });
  });
  at::Tensor counts = stats.to_tensor();
  return {out, counts};
}

// |d|^p and its gradient factor: the per-element work of the fused forward. At d = 0 the
// subgradient 0 is used (autograd of |d|^p gives 0 there for p >= 1); a NaN d gives a NaN gradient.
struct PowerTerm {
  double p;
  float gscale;
  float pm1;

  PowerTerm(double p_, float gscale_) : p(p_), gscale(gscale_), pm1(static_cast<float>(p_ - 1.0)) {}

  // Adds |d|^p to acc and returns the gradient entry.
  inline float operator()(float d, double& acc) const {
    if (p == 2.0) {
      acc += static_cast<double>(d) * d;
      return gscale * d;
    }
    const float a = std::fabs(d);
    acc += std::pow(static_cast<double>(a), p);
    return (a == 0.f) ? 0.f : (d != d ? d : gscale * std::copysign(std::pow(a, pm1), d));
  }
};

// What sorted_pass found.
enum class PassOutcome {
  kBadIndex,    // the permutation holds an index outside the segment (checked before it is read through)
  kSorted,      // the permutation still sorts the segment: value and gradient are final
  kUnsorted,    // a few descents: worth repairing from this permutation
  kDisordered,  // too many descents for a repair (stopped early): sort in full
};

// The fused forward's common case with a kept permutation: after a small step it usually still
// sorts the segment, so value and gradient are computed in the same pass that checks the order
// (one read of the projections, no item buffer). Unless the outcome is kSorted, `gs` holds
// partial values the caller overwrites. Every kDisorderCheckBlock elements the pass stops once
// the descents seen make a repair pointless (after a redraw the kept order is unrelated).
template <typename Load, typename RefT>
PassOutcome sorted_pass(const Load& x, const RefT* r, float* gs, const int32_t* ps, int64_t n, const PowerTerm& term,
                        double& acc) {
  int64_t descents = 0;
  uint32_t prev = 0;
  // Four partial sums: one float64 chain would make every element wait for the previous add
  // (the pass is otherwise a few cycles per element); the fixed grouping keeps it deterministic.
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  auto step = [&](int64_t k, double& a) -> bool {
    const uint32_t idx = static_cast<uint32_t>(ps[k]);
    if (idx >= static_cast<uint64_t>(n)) return false;
    const float v = x(idx);
    const uint32_t key = float_key(v);
    descents += key < prev;
    prev = key;
    gs[idx] = term(v - static_cast<float>(r[k]), a);
    return true;
  };
  int64_t k = 0;
  while (k + 4 <= n) {
    const int64_t block_end = std::min(n, k + kDisorderCheckBlock);
    for (; k + 4 <= block_end; k += 4) {
      if (!(step(k, part[0]) && step(k + 1, part[1]) && step(k + 2, part[2]) && step(k + 3, part[3]))) {
        return PassOutcome::kBadIndex;
      }
    }
    if (too_disordered(descents, n)) return PassOutcome::kDisordered;
  }
  for (; k < n; ++k) {
    if (!step(k, part[k & 3])) return PassOutcome::kBadIndex;
  }
  acc = (part[0] + part[1]) + (part[2] + part[3]);
  return descents == 0 ? PassOutcome::kSorted : PassOutcome::kUnsorted;
}

// One segment of the fused forward: sorts x (through the loader), writes the gradient and the
// permutation, returns the segment's float64 partial sum. Sets `bad_perm` (and returns 0) when a
// reused permutation holds an out-of-range index. `check_first`: with `reuse`, first try the
// one-pass sorted_pass (right when the permutation usually still sorts the segment, as a kept
// permutation after a small step does); without it a reused permutation goes straight to the
// repair path, which finds an unchanged order too, in a pass that also builds the sort's items.
template <typename Load, typename RefT>
double fused_segment(const Load& x, const RefT* r, float* gs, int32_t* ps, int64_t n, bool reuse,
                     const PowerTerm& term, ReuseStats& stats, std::atomic<bool>& bad_perm,
                     bool check_first = true) {
  double acc = 0.0;
  if (reuse && check_first) {
    switch (sorted_pass(x, r, gs, ps, n, term, acc)) {
      case PassOutcome::kBadIndex:
        bad_perm.store(true, std::memory_order_relaxed);
        return 0.0;
      case PassOutcome::kSorted:
        stats.already_sorted.fetch_add(1, std::memory_order_relaxed);
        return acc;
      case PassOutcome::kDisordered:
        reuse = false;  // sort from the natural order: gathering through the old one buys nothing
        break;
      case PassOutcome::kUnsorted:
        break;
    }
  }
  thread_local std::vector<uint64_t> items_buf, tmp_buf;
  uint64_t* items = scratch(items_buf, n);
  uint64_t* tmp = scratch(tmp_buf, n);
  const bool unchanged = sort_segment_pairs(x, n, ps, reuse, items, tmp, stats);
  // the grouping of sorted_pass (position k into partial sum k mod 4): the value does not depend
  // on which path ran, so a resumed run (no kept permutation) repeats an uninterrupted one bit for bit
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t idx = static_cast<uint32_t>(items[k]);
    const float v = key_float(static_cast<uint32_t>(items[k] >> 32));
    gs[idx] = term(v - static_cast<float>(r[k]), part[k & 3]);
  }
  acc = (part[0] + part[1]) + (part[2] + part[3]);
  if (ps != nullptr && !unchanged) {
    for (int64_t k = 0; k < n; ++k) ps[k] = static_cast<int32_t>(static_cast<uint32_t>(items[k]));
  }
  return acc;
}

// fused_segment for a reference given sorted (`ref` is the segment's sorted reference) or
// unsorted (`sort_ref`: resample's fresh W0 Θ, sorted here in thread-local buffers, and its order
// seeds the sort of x, since W Θ along the same directions nearly keeps W0 Θ's order).
template <typename Load, typename RefT>
double fused_segment_with_ref(const Load& x, const RefT* ref, bool sort_ref, float* gs, int32_t* ps, int64_t n,
                              bool reuse, const PowerTerm& term, ReuseStats& stats, std::atomic<bool>& bad_perm) {
  if (!sort_ref) return fused_segment(x, ref, gs, ps, n, reuse, term, stats, bad_perm);
  thread_local std::vector<float> ref_sorted_buf;
  thread_local std::vector<int32_t> ref_order_buf;
  float* sorted = scratch(ref_sorted_buf, n);
  int32_t* order = scratch(ref_order_buf, n);
  sort_with_order(ref, n, sorted, order);
  // W has moved away from W0 (whose copy is usually bf16), so the reference's order rarely
  // sorts x exactly: no separate sorted-order check
  return fused_segment(x, sorted, gs, order, n, /*reuse=*/true, term, stats, bad_perm, /*check_first=*/false);
}

// The end of a fused call: refuse a bad kept permutation, add the per-segment float64 sums in
// segment order (deterministic), and return (value float64 0-dim, grad, stats).
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_fused(const std::vector<double>& partial, double scale,
                                                            const std::atomic<bool>& bad_perm,
                                                            const ReuseStats& stats, const at::Tensor& grad) {
  TORCH_CHECK(!bad_perm.load(), "perm holds an index outside its segment: it is not a kept permutation");
  double total = 0.0;
  for (double v : partial) total += v;
  return {at::scalar_tensor(total * scale, at::kDouble), grad, stats.to_tensor()};
}

// Fused forward of the regularizer's reduction: value = Σ_k |sort(x)_k − ref_k|^p · scale and its
// gradient w.r.t. proj, grad[perm[k]] = scale · p · sign(d_k) |d_k|^(p−1), in the same pass as the
// sort, where x = proj, or x = proj + offset (float32 sum) when `offset` is given: a constant part
// of the projections (the LoRA path's cached W0 Θ) that is never materialised as float32.
// Per-segment partial sums are float64 and added in segment order (deterministic).
// With `sort_ref` the reference is given unsorted (resample's fresh W0 Θ): each segment's is
// sorted here, in thread-local buffers, and its sorting permutation seeds the sort of x (W Θ along
// the same directions nearly keeps W0 Θ's order). Compared with a separate sort, neither the
// sorted reference nor its permutations go through memory. No kept permutation is read or written.
// Returns (value float64 0-dim, grad float32 like proj (grad_out when given), stats).
std::tuple<at::Tensor, at::Tensor, at::Tensor> swd_forward(const at::Tensor& proj, const at::Tensor& sorted_ref,
                                                           const at::Tensor& offsets,
                                                           const c10::optional<at::Tensor>& perm, bool reuse,
                                                           double p, double scale,
                                                           const c10::optional<at::Tensor>& offset,
                                                           const c10::optional<at::Tensor>& grad_out,
                                                           bool sort_ref) {
  check_flat(proj, "proj");
  check_ref(sorted_ref, "sorted_ref", proj.numel());
  TORCH_CHECK(!sort_ref || !(perm.has_value() && perm->defined()),
              "sort_ref=True takes no perm buffer: the reference's own sort seeds each segment");
  const bool shifted = offset.has_value() && offset->defined();
  if (shifted) check_ref(*offset, "offset", proj.numel());
  check_offsets(offsets, proj.numel(), "proj");
  TORCH_CHECK(p > 0, "p must be > 0, got ", p);
  // the indices of a reused permutation are checked segment by segment as they are read
  int32_t* pm = prepare_perm(perm, reuse, offsets, proj.numel(), /*check_range=*/false);
  const int64_t num_segments = offsets.numel() - 1;
  // A caller that calls every step may pass its own gradient buffer: a fresh allocation of tens
  // of megabytes costs a page fault per 4 KiB on first touch, more than the scatter itself.
  at::Tensor grad = out_or_new(grad_out, "grad_out", proj, "proj");
  std::vector<double> partial(static_cast<size_t>(num_segments), 0.0);
  const float* x = proj.data_ptr<float>();
  float* g = grad.data_ptr<float>();
  const PowerTerm term(p, static_cast<float>(scale * p));
  ReuseStats stats;
  std::atomic<bool> bad_perm{false};
  const int64_t numel = proj.numel();
  const float* base_f32 = shifted && offset->scalar_type() == at::kFloat ? offset->data_ptr<float>() : nullptr;
  const at::BFloat16* base_bf16 =
      shifted && offset->scalar_type() == at::kBFloat16 ? offset->data_ptr<at::BFloat16>() : nullptr;
  with_ref(sorted_ref, [&](const auto* ref) {
    auto run = [&](const auto& make_loader) {
      for_each_segment(offsets, [&](int64_t s, int64_t start, int64_t n) {
        // The gathers and scatters through a permutation touch this segment's cache lines in
        // random order, which the hardware prefetcher cannot follow: ask for the lines of the
        // next stretch of the buffer (the next segment, taken to be about as long) now.
        const int64_t ahead = std::min(start + 2 * n, numel);
        prefetch_range(x, start + n, ahead, /*write=*/false);
        prefetch_range(g, start + n, ahead, /*write=*/true);
        if (base_f32 != nullptr) prefetch_range(base_f32, start + n, ahead, false);
        if (base_bf16 != nullptr) prefetch_range(base_bf16, start + n, ahead, false);
        partial[static_cast<size_t>(s)] =
            fused_segment_with_ref(make_loader(start), ref + start, sort_ref, g + start,
                                   pm != nullptr ? pm + start : nullptr, n, reuse, term, stats, bad_perm);
      });
    };
    if (!shifted) {
      run([x](int64_t start) {
        const float* xs = x + start;
        return [xs](int64_t i) { return xs[i]; };
      });
    } else {
      with_ref(*offset, [&](const auto* base) {
        run([x, base](int64_t start) {
          const float* xs = x + start;
          const auto* bs = base + start;
          return [xs, bs](int64_t i) { return xs[i] + static_cast<float>(bs[i]); };
        });
      });
    }
  });
  return finish_fused(partial, scale, bad_perm, stats, grad);
}

// ------------------------------------------------------------------------------------------
// Checks shared by the per-term kernels (plain_swd_forward, lora_swd_forward): the segments split
// into num_terms terms of L segments each (L returned), and term t's L segments share one length.
int64_t directions_per_term(const at::Tensor& offsets, int64_t num_terms) {
  const int64_t num_segments = offsets.numel() - 1;
  TORCH_CHECK(num_terms > 0 && num_segments % num_terms == 0, num_segments, " segments do not split into ",
              num_terms, " terms");
  return num_segments / num_terms;
}

int64_t term_segment_length(const int64_t* o, int64_t t, int64_t L) {
  const int64_t n = o[t * L + 1] - o[t * L];
  for (int64_t l = 1; l < L; ++l) {
    TORCH_CHECK(o[t * L + l + 1] - o[t * L + l] == n, "term ", t, ": its ", L, " segments differ in length");
  }
  return n;
}

bool is_float_matrix(const at::Tensor& m) {
  return m.device().is_cpu() && m.scalar_type() == at::kFloat && m.dim() == 2;
}

// ------------------------------------------------------------------------------------------
// plain_swd_forward: swd_forward for terms that are all plain weights, with the projections
// formed here. Term t (of T) owns segments [t·L, (t+1)·L) of `offsets` (one per direction, each of
// its n_t rows). Per term the kernel writes X = Θ_tᵀ W_tᵀ (L, n_t) into a thread-local buffer and
// runs swd_forward's per-segment pass on X's rows, writing the gradient into the flat `grad`
// (which the backward's dW = Gᵀ Θᵀ reads). Compared with one GEMM per term into a flat buffer and
// then one pass over it, X is sorted while it is still in cache instead of crossing memory twice,
// and each thread runs its terms' GEMMs single-threaded, with no fork and join per product.
// Threads take whole terms from a shared counter, largest first (SmolLM2's embedding holds a
// quarter of all values), and each segment's float64 sum has its own slot added in segment
// order: the value does not depend on which thread ran which term.
// `w[t]`: (n_t, d_t) float32; `theta_t[t]`: (L, d_t) float32, Θ_tᵀ. `sort_ref`, `perm`, `reuse`,
// `p`, `scale`, `grad_out`: as in swd_forward. Returns (value float64 0-dim, grad, stats).
std::tuple<at::Tensor, at::Tensor, at::Tensor> plain_swd_forward(
    const at::Tensor& sorted_ref, const at::Tensor& offsets, const std::vector<at::Tensor>& w,
    const std::vector<at::Tensor>& theta_t, const c10::optional<at::Tensor>& perm, bool reuse, double p,
    double scale, const c10::optional<at::Tensor>& grad_out, bool sort_ref) {
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 1 &&
                  offsets.numel() >= 1 && offsets.is_contiguous(),
              "offsets must be a contiguous 1-D int64 CPU tensor");
  const int64_t total = offsets.data_ptr<int64_t>()[offsets.numel() - 1];
  check_ref(sorted_ref, "sorted_ref", total);
  check_offsets(offsets, total, "sorted_ref");
  TORCH_CHECK(p > 0, "p must be > 0, got ", p);
  TORCH_CHECK(!sort_ref || !(perm.has_value() && perm->defined()),
              "sort_ref=True takes no perm buffer: the reference's own sort seeds each segment");
  const int64_t num_terms = static_cast<int64_t>(w.size());
  const int64_t num_segments = offsets.numel() - 1;
  TORCH_CHECK(num_terms > 0 && static_cast<int64_t>(theta_t.size()) == num_terms,
              "w and theta_t must hold one matrix per term, got ", w.size(), " and ", theta_t.size());
  const int64_t L = directions_per_term(offsets, num_terms);
  const int64_t* o = offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_terms; ++t) {
    const size_t i = static_cast<size_t>(t);
    TORCH_CHECK(is_float_matrix(w[i]) && is_float_matrix(theta_t[i]), "w and theta_t of term ", t,
                " must be float32 CPU matrices");
    const int64_t n = term_segment_length(o, t, L);
    TORCH_CHECK(w[i].size(0) == n, "term ", t, ": w has ", w[i].size(0), " rows, its segments have ", n);
    TORCH_CHECK(theta_t[i].size(0) == L && theta_t[i].size(1) == w[i].size(1), "term ", t, ": theta_t ",
                theta_t[i].sizes(), " is not (", L, ", ", w[i].size(1), ") for w ", w[i].sizes());
  }
  at::Tensor grad;
  if (grad_out.has_value() && grad_out->defined()) {
    check_flat(*grad_out, "grad_out");
    TORCH_CHECK(grad_out->numel() == total, "grad_out has ", grad_out->numel(), " elements, expected ", total);
    grad = *grad_out;
  } else {
    grad = at::empty({total}, sorted_ref.options().dtype(at::kFloat));
  }
  int32_t* pm = prepare_perm(perm, reuse, offsets, total, /*check_range=*/false);
  float* g = grad.data_ptr<float>();
  std::vector<double> partial(static_cast<size_t>(num_segments), 0.0);
  const PowerTerm term(p, static_cast<float>(scale * p));
  ReuseStats stats;
  std::atomic<bool> bad_perm{false};
  std::vector<int64_t> order(static_cast<size_t>(num_terms));
  for (int64_t t = 0; t < num_terms; ++t) order[static_cast<size_t>(t)] = t;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return w[static_cast<size_t>(a)].numel() > w[static_cast<size_t>(b)].numel();
  });
  std::atomic<int64_t> next{0};
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  with_ref(sorted_ref, [&](const auto* ref) {
    // one worker per thread; each takes the next largest term until none is left
    at::parallel_for(0, std::max<int64_t>(1, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      thread_local std::vector<float> x_buf;
      for (int64_t k = next.fetch_add(1); k < num_terms; k = next.fetch_add(1)) {
        const int64_t t = order[static_cast<size_t>(k)];
        const size_t i = static_cast<size_t>(t);
        const int64_t n = w[i].size(0);
        float* xp = scratch(x_buf, L * n);
        at::Tensor x = at::from_blob(xp, {L, n}, f32);
        at::mm_out(x, theta_t[i], w[i].t());
        for (int64_t l = 0; l < L; ++l) {
          const int64_t s = t * L + l, so = o[s];
          // the gradient is scattered through the permutation: see swd_forward
          prefetch_range(g, so + n, std::min(so + 2 * n, total), /*write=*/true);
          const float* xs = xp + l * n;
          partial[static_cast<size_t>(s)] = fused_segment_with_ref(
              [xs](int64_t j) { return xs[j]; }, ref + so, sort_ref, g + so, pm != nullptr ? pm + so : nullptr, n,
              reuse, term, stats, bad_perm);
        }
      }
    });
  });
  return finish_fused(partial, scale, bad_perm, stats, grad);
}

// ------------------------------------------------------------------------------------------
// lora_swd_forward: swd_forward for terms that are all LoRA layers, W = W0 + s·U V, with the
// factor gradients and without any buffer of projections or gradients. Term t owns segments
// [t·L, (t+1)·L) of `offsets` (one per direction, each of its n_t rows). Per term the kernel forms
// inner = s·V Θ (r×L) and X = base + innerᵀ Uᵀ in a thread-local (L, n) buffer, runs
// swd_forward's sort and reduction on X's rows into a thread-local gradient G = ∂value/∂X, and
// turns G into dU = (inner G)ᵀ and dV = s·(Uᵀ Gᵀ) Θᵀ while both buffers are still in cache.
// Compared with the flat path (a GEMM writing every projection to memory, the fused pass writing
// every gradient, two GEMMs reading it back, a few small GEMMs per layer from Python) only the
// cached W0 Θ, the sorted reference and the permutation cross memory. Threads take whole terms
// (the small GEMMs run single-threaded inside the parallel region), so nothing is shared between
// them and the sums are deterministic.
// Returns (value float64 0-dim, [dU_t (n_t, r_t)], [dV_t (r_t, d_t)], stats).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> lora_swd_forward(
    const at::Tensor& base, const at::Tensor& sorted_ref, const at::Tensor& offsets, const std::vector<at::Tensor>& u,
    const std::vector<at::Tensor>& v, const std::vector<at::Tensor>& theta, const std::vector<double>& scaling,
    const c10::optional<at::Tensor>& perm, bool reuse, double p, double scale) {
  const int64_t total = base.numel();
  check_ref(base, "base", total);
  check_ref(sorted_ref, "sorted_ref", total);
  check_offsets(offsets, total, "base");
  TORCH_CHECK(p > 0, "p must be > 0, got ", p);
  const int64_t num_terms = static_cast<int64_t>(u.size());
  const int64_t num_segments = offsets.numel() - 1;
  TORCH_CHECK(num_terms > 0 && static_cast<int64_t>(v.size()) == num_terms &&
                  static_cast<int64_t>(theta.size()) == num_terms && static_cast<int64_t>(scaling.size()) == num_terms,
              "u, v, theta and scaling must hold one entry per term, got ", u.size(), ", ", v.size(), ", ",
              theta.size(), " and ", scaling.size());
  const int64_t L = directions_per_term(offsets, num_terms);
  const int64_t* o = offsets.data_ptr<int64_t>();
  std::vector<int64_t> term_offsets(static_cast<size_t>(num_terms) + 1, 0);
  std::vector<at::Tensor> du(static_cast<size_t>(num_terms)), dv(static_cast<size_t>(num_terms));
  for (int64_t t = 0; t < num_terms; ++t) {
    const size_t i = static_cast<size_t>(t);
    const int64_t n = term_segment_length(o, t, L);
    TORCH_CHECK(is_float_matrix(u[i]) && is_float_matrix(v[i]) && is_float_matrix(theta[i]),
                "u, v and theta of term ", t, " must be float32 CPU matrices");
    TORCH_CHECK(u[i].size(0) == n, "u[", t, "] has ", u[i].size(0), " rows, its segments have ", n);
    TORCH_CHECK(v[i].size(0) == u[i].size(1) && theta[i].size(0) == v[i].size(1) && theta[i].size(1) == L,
                "term ", t, ": u ", u[i].sizes(), ", v ", v[i].sizes(), " and theta ", theta[i].sizes(),
                " are not (n, r), (r, d) and (d, ", L, ")");
    term_offsets[i + 1] = o[(t + 1) * L];
    du[i] = at::empty(u[i].sizes(), u[i].options().memory_format(at::MemoryFormat::Contiguous));
    dv[i] = at::empty(v[i].sizes(), v[i].options().memory_format(at::MemoryFormat::Contiguous));
  }
  int32_t* pm = prepare_perm(perm, reuse, offsets, total, /*check_range=*/false);
  std::vector<double> partial(static_cast<size_t>(num_segments), 0.0);
  const PowerTerm term(p, static_cast<float>(scale * p));
  ReuseStats stats;
  std::atomic<bool> bad_perm{false};
  const std::vector<int64_t> bounds = balanced_chunks(term_offsets.data(), num_terms);
  const int64_t nchunks = static_cast<int64_t>(bounds.size()) - 1;
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  with_ref(sorted_ref, [&](const auto* ref) {
    with_ref(base, [&](const auto* b) {
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        // One term's (L, n) projections and gradients, small enough to stay in cache between the
        // GEMMs and the sort passes.
        thread_local std::vector<float> x_buf, g_buf, dut_buf;
        for (int64_t t = bounds[c0]; t < bounds[c1]; ++t) {
          const size_t i = static_cast<size_t>(t);
          const int64_t n = u[i].size(0), r = u[i].size(1), start = o[t * L];
          float* xp = scratch(x_buf, L * n);
          float* gp = scratch(g_buf, L * n);
          for (int64_t k = 0; k < L * n; ++k) xp[k] = static_cast<float>(b[start + k]);
          at::Tensor x = at::from_blob(xp, {L, n}, f32);
          at::Tensor g = at::from_blob(gp, {L, n}, f32);
          const at::Tensor inner = at::mm(v[i], theta[i]).mul_(scaling[i]);  // (r, L)
          x.addmm_(inner.t(), u[i].t());                                     // W0 Θ + (U inner)ᵀ
          for (int64_t l = 0; l < L; ++l) {
            const int64_t s = t * L + l, so = o[s];
            const float* xs = xp + l * n;
            partial[static_cast<size_t>(s)] = fused_segment(
                [xs](int64_t k) { return xs[k]; }, ref + so, gp + l * n, pm != nullptr ? pm + so : nullptr, n,
                reuse, term, stats, bad_perm);
          }
          // (r, L) @ (L, n) with n innermost, then transposed: MKL runs this skinny product several
          // times faster than Gᵀ innerᵀ straight into the (n, r) layout
          at::Tensor dut = at::from_blob(scratch(dut_buf, r * n), {r, n}, f32);
          at::mm_out(dut, inner, g);
          du[i].copy_(dut.t());
          at::Tensor d_inner = at::mm(u[i].t(), g.t()).mul_(scaling[i]);  // (r, L)
          at::mm_out(dv[i], d_inner, theta[i].t());
        }
      });
    });
  });
  TORCH_CHECK(!bad_perm.load(), "perm holds an index outside its segment: it is not a kept permutation");
  double value_sum = 0.0;
  for (double val : partial) value_sum += val;
  at::Tensor value = at::scalar_tensor(value_sum * scale, at::kDouble);
  at::Tensor counts = stats.to_tensor();
  return {value, du, dv, counts};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "snap_fast CPU kernels: segmented float sort, matched targets, fused SWD forward";
  m.def("sort_segments", &sort_segments, "Ascending sort of every segment of a flat float32 buffer",
        pybind11::arg("x"), pybind11::arg("offsets"), pybind11::arg("out") = c10::nullopt,
        pybind11::arg("perm") = c10::nullopt);
  m.def("match_sorted", &match_sorted, "Matched targets T[perm[k]] = ref[k] per segment",
        pybind11::arg("proj"), pybind11::arg("sorted_ref"), pybind11::arg("offsets"),
        pybind11::arg("perm") = c10::nullopt, pybind11::arg("reuse") = false);
  m.def("swd_forward", &swd_forward, "Fused SWD value and gradient w.r.t. the projections",
        pybind11::arg("proj"), pybind11::arg("sorted_ref"), pybind11::arg("offsets"),
        pybind11::arg("perm"), pybind11::arg("reuse"), pybind11::arg("p"), pybind11::arg("scale"),
        pybind11::arg("offset") = c10::nullopt, pybind11::arg("grad_out") = c10::nullopt,
        pybind11::arg("sort_ref") = false);
  m.def("plain_swd_forward", &plain_swd_forward, "Fused SWD value and gradient, projections formed per term",
        pybind11::arg("sorted_ref"), pybind11::arg("offsets"), pybind11::arg("w"), pybind11::arg("theta_t"),
        pybind11::arg("perm"), pybind11::arg("reuse"), pybind11::arg("p"), pybind11::arg("scale"),
        pybind11::arg("grad_out") = c10::nullopt, pybind11::arg("sort_ref") = false);
  m.def("lora_swd_forward", &lora_swd_forward, "Fused SWD value and LoRA factor gradients, no flat buffers",
        pybind11::arg("base"), pybind11::arg("sorted_ref"), pybind11::arg("offsets"), pybind11::arg("u"),
        pybind11::arg("v"), pybind11::arg("theta"), pybind11::arg("scaling"), pybind11::arg("perm"),
        pybind11::arg("reuse"), pybind11::arg("p"), pybind11::arg("scale"));
}
