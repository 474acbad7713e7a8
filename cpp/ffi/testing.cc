// The extension's test and benchmark hooks, the submodule _jax_brgemm.testing (ext.testing in
// Python): a direct kernel call for tests of all three batch forms, the measured peaks and
// a single-thread kernel benchmark, the kernel layer's transposes, the streaming-store
// threshold and a probe of which thread ran each item of a parallel loop. Not API.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <random>
#include <stdexcept>
#include <thread>

#include "ffi/common.h"
#include "primitives/elements.h"

namespace nb = nanobind;

namespace jbr::ffi_handlers {

namespace {

Isa isa_or_active(const std::string& name) {
  if (name.empty()) return active_isa();
  Isa isa;
  if (!parse_isa(name, &isa)) throw nb::value_error(("isa: unknown ISA '" + name + "'").c_str());
  if (!isa_supported(isa)) throw nb::value_error(("isa: '" + name + "' is not supported by this CPU").c_str());
  return isa;
}

Activation activation_or_throw(const std::string& name) {
  Activation act;
  if (!parse_activation(name, &act)) throw nb::value_error(("activation: unknown '" + name + "'").c_str());
  return act;
}

using F32Array = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
// float32, or bfloat16 given as its uint16 bit patterns.
using AnyArray = nb::ndarray<nb::c_contig, nb::device::cpu>;

DType array_dtype(const AnyArray& array, const char* name) {
  if (array.dtype() == nb::dtype<float>()) return DType::f32;
  if (array.dtype() == nb::dtype<uint16_t>()) return DType::bf16;
  throw nb::type_error((std::string(name) + ": must be float32 or uint16 (bfloat16 bits)").c_str());
}
using I64Array = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// One kernel call on raw pools: C (m x ldc rows) is updated in place. Offsets name the
// blocks for the offset form and are turned into pointers for the address form.
void kernel_call(const std::string& form, AnyArray a_pool, AnyArray b_pool, AnyArray c,
                 int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                 int64_t count, int64_t stride_a, int64_t stride_b, I64Array offs_a,
                 I64Array offs_b, float alpha, float beta, const std::string& activation,
                 nb::object bias, const std::string& isa, bool b_vnni) {
  Desc d;
  d.m = m, d.n = n, d.k = k, d.lda = lda, d.ldb = ldb, d.ldc = ldc, d.beta = beta;
  d.a_dtype = array_dtype(a_pool, "a_pool");
  d.b_dtype = array_dtype(b_pool, "b_pool");
  d.c_dtype = array_dtype(c, "c");
  d.activation = activation_or_throw(activation);
  d.isa = isa_or_active(isa);
  const float* bias_ptr = nullptr;
  F32Array bias_array;
  if (!bias.is_none()) {
    bias_array = nb::cast<F32Array>(bias);
    if (bias_array.size() != static_cast<size_t>(n)) throw nb::value_error("bias: must have n elements");
    bias_ptr = bias_array.data();
    d.has_bias = true;
  }
  if (std::string error = validate(d); !error.empty()) throw nb::value_error(error.c_str());
  // Everything the kernel will touch must lie inside the arrays.
  auto check_span = [](int64_t first, int64_t rows, int64_t cols, int64_t ld, size_t size,
                       const char* name) {
    const int64_t last = first + (rows - 1) * ld + cols;
    if (first < 0 || last > static_cast<int64_t>(size))
      throw nb::value_error((std::string(name) + ": block outside the array").c_str());
  };
  check_span(0, m, n, ldc, c.size(), "c");
  std::vector<int64_t> oa(count), ob(count);
  for (int64_t i = 0; i < count; ++i) {
    oa[i] = form == "stride" ? i * stride_a : offs_a(i);
    ob[i] = form == "stride" ? i * stride_b : offs_b(i);
    check_span(oa[i], m, k, lda, a_pool.size(), "a_pool");
    check_span(ob[i], k, n, ldb, b_pool.size(), "b_pool");
  }
  // b_vnni: every B block packed into the pair-interleaved layout first (as a primitive
  // packs its weights), in the same order, and the kernel reads that.
  std::vector<uint16_t> vnni_pool;
  if (b_vnni) {
    if (d.b_dtype != DType::bf16) throw nb::value_error("b_vnni: needs bfloat16 inputs");
    const int64_t ld = vnni_tile_ld(k), size = vnni_elements(k, n);
    vnni_pool.resize(count * size);
    for (int64_t i = 0; i < count; ++i) {
      pack_b_vnni(static_cast<const uint16_t*>(b_pool.data()) + ob[i], ldb, k, n,
                  vnni_pool.data() + i * size, ld);
      ob[i] = i * size;
    }
    d.b_vnni = true, d.ldb = ld, stride_b = size;
    if (std::string error = validate(d); !error.empty()) throw nb::value_error(error.c_str());
  }
  const void* b_data = b_vnni ? static_cast<const void*>(vnni_pool.data()) : b_pool.data();
  const Kernel& kernel = get_kernel(d);
  if (form == "stride") {
    kernel(Batch::strided(a_pool.data(), stride_a, b_data, stride_b, count), c.data(), alpha, bias_ptr);
  } else if (form == "offset") {
    kernel(Batch::offsets(a_pool.data(), oa.data(), b_data, ob.data(), count), c.data(), alpha, bias_ptr);
  } else if (form == "address") {
    const int64_t size = d.a_dtype == DType::bf16 ? 2 : 4;
    std::vector<const void*> pa(count), pb(count);
    for (int64_t i = 0; i < count; ++i) {
      pa[i] = static_cast<const char*>(a_pool.data()) + oa[i] * size;
      pb[i] = static_cast<const char*>(b_data) + ob[i] * size;
    }
    kernel(Batch::addresses(pa.data(), pb.data(), count), c.data(), alpha, bias_ptr);
  } else {
    throw nb::value_error("form: must be 'stride', 'offset' or 'address'");
  }
}

// Single-thread GFLOP/s of one kernel shape on in-cache data: the median of `samples`
// timings (thread CPU time), each long enough (>= ~20 ms) to dwarf the clock's resolution.
double bench_kernel(int64_t m, int64_t n, int64_t k, int64_t count, const std::string& form,
                    const std::string& isa, const std::string& dtype, int samples, bool b_vnni) {
  Desc d;
  d.m = m, d.n = n, d.k = k, d.lda = k, d.ldb = n, d.ldc = n, d.beta = 1.0f;
  d.isa = isa_or_active(isa);
  if (dtype != "float32" && dtype != "bfloat16") throw nb::value_error("dtype: must be float32 or bfloat16");
  d.a_dtype = d.b_dtype = dtype == "bfloat16" ? DType::bf16 : DType::f32;
  // b_vnni: B blocks already in the pair-interleaved layout (as a primitive's packed weights).
  d.b_vnni = b_vnni;
  if (b_vnni) d.ldb = vnni_tile_ld(k);
  if (std::string error = validate(d); !error.empty()) throw nb::value_error(error.c_str());
  const int64_t b_block = b_vnni ? vnni_elements(k, n) : k * n;
  // float32 storage is large enough for either dtype; bfloat16 uses the first half.
  // 64-byte aligned, as the primitives' packed blocks and XLA's buffers are (a std::vector
  // this large sits 16 bytes past a page, and every B row load would split a cache line).
  auto a = prim::work_buffer<float>(count * m * k), b = prim::work_buffer<float>(count * b_block),
       c = prim::work_buffer<float>(m * n);
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (int64_t i = 0; i < count * m * k; ++i) a[i] = dist(rng);
  for (int64_t i = 0; i < count * b_block; ++i) b[i] = dist(rng);
  std::fill_n(c.get(), m * n, 0.0f);
  const int64_t size = d.a_dtype == DType::bf16 ? 2 : 4;
  std::vector<int64_t> oa(count), ob(count);
  std::vector<const void*> pa(count), pb(count);
  for (int64_t i = 0; i < count; ++i) {
    oa[i] = i * m * k, ob[i] = i * b_block;
    pa[i] = reinterpret_cast<const char*>(a.get()) + oa[i] * size;
    pb[i] = reinterpret_cast<const char*>(b.get()) + ob[i] * size;
  }
  Batch batch;
  if (form == "stride") batch = Batch::strided(a.get(), m * k, b.get(), b_block, count);
  else if (form == "offset") batch = Batch::offsets(a.get(), oa.data(), b.get(), ob.data(), count);
  else if (form == "address") batch = Batch::addresses(pa.data(), pb.data(), count);
  else throw nb::value_error("variant: must be 'stride', 'offset' or 'address'");
  const Kernel& kernel = get_kernel(d);
  nb::gil_scoped_release release;
  // Thread CPU time, like the peak loops: the ratio stays meaningful on a shared machine.
  const double flops = 2.0 * m * n * k * count;
  int64_t reps = 1;
  for (;;) {  // calibrate reps to ~20 ms
    const double t0 = thread_cpu_seconds();
    for (int64_t r = 0; r < reps; ++r) kernel(batch, c.get());
    if (thread_cpu_seconds() - t0 > 0.02) break;
    reps *= 2;
  }
  std::vector<double> rates;
  for (int s = 0; s < samples; ++s) {
    const double t0 = thread_cpu_seconds();
    for (int64_t r = 0; r < reps; ++r) kernel(batch, c.get());
    rates.push_back(flops * reps / (thread_cpu_seconds() - t0) * 1e-9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

// src.T through one of the kernel layer's transposes (tests compare it with numpy).
template <class T, void (*Transpose)(const T*, int64_t, int64_t, int64_t, T*, int64_t, Isa)>
nb::ndarray<nb::numpy, T, nb::ndim<2>> transpose_array(
    nb::ndarray<T, nb::ndim<2>, nb::c_contig, nb::device::cpu> src, const std::string& isa) {
  const int64_t rows = src.shape(0), cols = src.shape(1);
  T* out = new T[std::max<int64_t>(rows * cols, 1)];
  nb::capsule owner(out, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  Transpose(src.data(), cols, rows, cols, out, rows, isa_or_active(isa));
  return nb::ndarray<nb::numpy, T, nb::ndim<2>>(out, {size_t(cols), size_t(rows)}, owner);
}

// Which thread ran each item of prim::parallel_for on a team of `threads` (0: the caller,
// then workers numbered as they first claim), how many times each item ran in `counts`:
// tests of the loop's split.
std::vector<int64_t> parallel_for_runners(int64_t n, int64_t threads, int64_t item_us, bool second_copies) {
  if (n < 0 || threads < 1) throw nb::value_error("parallel_for_runners: n must be >= 0 and threads >= 1");
  std::vector<std::atomic<int64_t>> runner(n), counts(n);
  std::atomic<int64_t> next_id{1};
  static std::atomic<int64_t> calls{0};
  const int64_t call = ++calls;
  const std::thread::id caller = std::this_thread::get_id();
  {
    nb::gil_scoped_release release;
    // second_copies: every task also runs on a thread of its own, as the handlers' tasks
    // also go to XLA's pool (a copy that starts late must neither run an item twice nor
    // add a thread once every range has one).
    prim::TeamCall team(threads, second_copies ? prim::TeamCall::Runner([](std::function<void()> task) {
                                   std::thread(std::move(task)).detach();
                                 })
                                               : nullptr);
    prim::parallel_for(&team, n, [&](int64_t i) {
      thread_local int64_t id = -1;
      thread_local int64_t id_call = 0;
      if (id_call != call) id_call = call, id = std::this_thread::get_id() == caller ? 0 : next_id++;
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(item_us);
      while (std::chrono::steady_clock::now() < until) {}
      runner[i] = id;
      counts[i]++;
    });
  }
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i) out.push_back(counts[i] == 1 ? runner[i].load() : -1 - counts[i]);
  return out;
}

}  // namespace

void add_testing_module(nb::module_& m) {
  nb::module_ testing = m.def_submodule("testing", "Test and benchmark hooks (not API): direct kernel "
                                        "calls, peak and kernel timings, transposes, threading probes.");
  testing.def("fma_peak_gflops", [](const std::string& isa, double seconds) {
    const Isa chosen = isa_or_active(isa);
    nb::gil_scoped_release release;
    return measure_fma_peak_gflops(chosen, seconds);
  }, nb::arg("isa") = "", nb::arg("seconds") = 0.2);
  testing.def("bench_kernel", &bench_kernel, nb::arg("m"), nb::arg("n"), nb::arg("k"),
              nb::arg("count"), nb::arg("variant") = "stride", nb::arg("isa") = "",
              nb::arg("dtype") = "float32", nb::arg("samples") = 7, nb::arg("b_vnni") = false);
  testing.def("bf16_peak_gflops", [](const std::string& isa, double seconds) {
    const Isa chosen = isa_or_active(isa);
    nb::gil_scoped_release release;
    return measure_bf16_peak_gflops(chosen, seconds);
  }, nb::arg("isa") = "", nb::arg("seconds") = 0.2,
     "Single-thread GFLOP/s of the ISA's native bfloat16 dot-product loop (0: none).");
  testing.def("transpose_f32", &transpose_array<float, transpose_f32>, nb::arg("src"), nb::arg("isa") = "",
              "src.T through the kernel layer's transpose (tests).");
  testing.def("transpose_bf16", &transpose_array<uint16_t, transpose_bf16>, nb::arg("src"),
              nb::arg("isa") = "", "src.T of 16-bit patterns through the kernel layer (tests).");
  testing.def("kernel_call", &kernel_call, nb::arg("form"), nb::arg("a_pool"), nb::arg("b_pool"),
              nb::arg("c"), nb::arg("m"), nb::arg("n"), nb::arg("k"), nb::arg("lda"), nb::arg("ldb"),
              nb::arg("ldc"), nb::arg("count"), nb::arg("stride_a"), nb::arg("stride_b"),
              nb::arg("offs_a"), nb::arg("offs_b"), nb::arg("alpha"), nb::arg("beta"),
              nb::arg("activation"), nb::arg("bias").none(), nb::arg("isa"), nb::arg("b_vnni") = false);
  testing.def("set_stream_bytes", [](int64_t bytes) { prim::set_stream_bytes(std::max<int64_t>(bytes, 0)); },
              nb::arg("bytes"),
              "Results of at least this many bytes are written with non-temporal stores where a "
              "loop nest can (0: the defaults, 8 MB for dense, a quarter of the L3 cache and at "
              "least 8 MB for convolutions); tests.");
  testing.def("conv_stream_bytes", [] { return prim::conv_stream_bytes(); });
  testing.def("parallel_for_runners", &parallel_for_runners, nb::arg("n"), nb::arg("threads"),
              nb::arg("item_us") = 0, nb::arg("second_copies") = false,
              "Per item of a parallel loop on `threads`: the thread that ran it (0: the caller), or "
              "-1 - times run where it did not run exactly once (tests).");
}

}  // namespace jbr::ffi_handlers
