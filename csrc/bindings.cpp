// pybind11 module prism_ext._C. Takes numpy arrays (prism_ext.kernels turns
// torch tensors into zero-copy numpy views), validates every argument so bad
// input raises instead of crashing, and releases the GIL while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <stdexcept>
#include <string>

#include "isa.h"
#include "ops.h"
#include "threadpool.h"

namespace py = pybind11;
using prism::Isa;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// An array of exactly dtype T (no conversion), `ndim` dimensions, non-negative
// strides that are whole elements, the last one 1.
template <typename T>
py::array_t<T> checked(const py::handle& obj, const char* name, py::ssize_t ndim) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + ": expected a numpy array");
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
                         ", got " + std::string(py::str(arr.dtype())));
  if (ndim >= 0 && arr.ndim() != ndim)
    fail(std::string(name) + ": expected " + std::to_string(ndim) + " dimensions, got shape " + shape_str(arr));
  for (py::ssize_t i = 0; i < arr.ndim(); ++i) {
    const py::ssize_t st = arr.strides(i);
    if (st < 0 || st % static_cast<py::ssize_t>(sizeof(T)) != 0)
      fail(std::string(name) + ": strides must be non-negative whole elements");
  }
  if (arr.ndim() > 0) {
    const py::ssize_t last = arr.strides(arr.ndim() - 1) / sizeof(T);
    if (!(last == 1 || arr.shape(arr.ndim() - 1) == 1))
      fail(std::string(name) + ": the last dimension must be contiguous");
  }
  return py::reinterpret_borrow<py::array_t<T>>(arr);
}

// Byte range [first, last) an array's elements span (not empty arrays).
std::pair<uintptr_t, uintptr_t> byte_extent(const py::array& a) {
  uintptr_t lo = reinterpret_cast<uintptr_t>(a.data()), hi = lo;
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    const py::ssize_t span = (a.shape(i) - 1) * a.strides(i);
    if (span < 0) lo += span; else hi += span;
  }
  return {lo, hi + a.itemsize()};
}

bool overlaps(const py::array& a, const py::array& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const auto ea = byte_extent(a), eb = byte_extent(b);
  return ea.first < eb.second && eb.first < ea.second;
}

template <typename T>
bool is_c_contiguous(const py::array_t<T>& a) {
  py::ssize_t expect = 1;
  for (py::ssize_t i = a.ndim() - 1; i >= 0; --i) {
    if (a.shape(i) != 1 && a.strides(i) / static_cast<py::ssize_t>(sizeof(T)) != expect) return false;
    expect *= a.shape(i);
  }
  return true;
}

template <typename T>
int64_t elem_stride(const py::array_t<T>& a, py::ssize_t dim) {
  return a.strides(dim) / static_cast<py::ssize_t>(sizeof(T));
}

// [batches, len] contiguous side input (counts, positions): batches in {1, B}.
template <typename T>
std::optional<py::array_t<T>> side_input(const py::object& obj, const char* name, int64_t B, int64_t len,
                                         int64_t* batches) {
  *batches = 1;
  if (obj.is_none()) return std::nullopt;
  auto a = checked<T>(obj, name, 2);
  if (!is_c_contiguous(a)) fail(std::string(name) + ": must be C-contiguous");
  if (!((a.shape(0) == 1 || a.shape(0) == B) && a.shape(1) == len))
    fail(std::string(name) + ": expected shape (1, " + std::to_string(len) + ") or (" + std::to_string(B) + ", " +
         std::to_string(len) + "), got " + shape_str(a));
  *batches = a.shape(0);
  return a;
}

py::tuple segment_means(const py::object& x_obj, int64_t seg, const py::object& valid_obj) {
  auto x = checked<float>(x_obj, "x", 3);
  if (seg < 1) fail("seg: must be >= 1, got " + std::to_string(seg));
  const int64_t L = x.shape(0), n = x.shape(1), d = x.shape(2);
  if (n < 1 || d < 1) fail("x: needs at least one row and one column, got shape " + shape_str(x));
  seg = std::min(seg, n);  // a longer segment is the whole row range; keeps the arithmetic in range
  std::optional<py::array_t<uint8_t>> valid;
  if (!valid_obj.is_none()) {
    valid = checked<uint8_t>(valid_obj, "valid", 2);
    if (!is_c_contiguous(*valid) || valid->shape(0) != L || valid->shape(1) != n)
      fail("valid: expected a C-contiguous array of shape (" + std::to_string(L) + ", " + std::to_string(n) +
           "), got " + shape_str(*valid));
  }
  const int64_t m = (n + seg - 1) / seg;
  py::array_t<float> means({L, m, d});
  py::array_t<float> counts({L, m});
  prism::SegmentMeansProblem p{x.data(), valid ? valid->data() : nullptr, means.mutable_data(),
                               counts.mutable_data(), L, n, d, seg, elem_stride(x, 0), elem_stride(x, 1)};
  {
    py::gil_scoped_release release;
    prism::segment_means_f32(p, prism::active_isa());
  }
  return py::make_tuple(means, counts);
}

py::array_t<float> compressed_attention(const py::object& q_obj, const py::object& k_obj, const py::object& v_obj,
                                        const py::object& counts_obj, const py::object& q_pos_obj,
                                        const py::object& k_pos_obj, double scale) {
  auto q = checked<float>(q_obj, "q", 4);
  auto k = checked<float>(k_obj, "k", 4);
  auto v = checked<float>(v_obj, "v", 4);
  const int64_t B = q.shape(0), H = q.shape(1), nq = q.shape(2), dh = q.shape(3), nk = k.shape(2);
  if (B < 1 || H < 1 || nq < 1 || dh < 1) fail("q: every dimension must be >= 1, got shape " + shape_str(q));
  if (k.shape(0) != B || k.shape(1) != H || k.shape(3) != dh || nk < 1)
    fail("k: expected shape (" + std::to_string(B) + ", " + std::to_string(H) + ", nk >= 1, " + std::to_string(dh) +
         "), got " + shape_str(k));
  if (v.shape(0) != B || v.shape(1) != H || v.shape(2) != nk || v.shape(3) != dh)
    fail("v: expected the shape of k " + shape_str(k) + ", got " + shape_str(v));
  if (!std::isfinite(scale)) fail("scale: must be finite");
  int64_t counts_batches = 1, qpos_batches = 1, kpos_batches = 1;
  auto counts = side_input<float>(counts_obj, "counts", B, nk, &counts_batches);
  auto q_pos = side_input<int32_t>(q_pos_obj, "q_pos", B, nq, &qpos_batches);
  auto k_pos = side_input<int32_t>(k_pos_obj, "k_pos", B, nk, &kpos_batches);
  if (q_pos.has_value() != k_pos.has_value()) fail("q_pos: q_pos and k_pos must be given together");
  if (q_pos && qpos_batches != kpos_batches) fail("k_pos: must have the same batch size as q_pos");
  py::array_t<float> out({B, H, nq, dh});
  prism::AttentionProblem p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.mutable_data();
  p.counts = counts ? counts->data() : nullptr;
  p.q_pos = q_pos ? q_pos->data() : nullptr;
  p.k_pos = k_pos ? k_pos->data() : nullptr;
  p.B = B; p.H = H; p.nq = nq; p.nk = nk; p.dh = dh;
  p.counts_batches = counts_batches;
  p.pos_batches = qpos_batches;
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = elem_stride(q, i);
    p.k_strides[i] = elem_stride(k, i);
    p.v_strides[i] = elem_stride(v, i);
    p.out_strides[i] = elem_stride(out, i);
  }
  p.scale = static_cast<float>(scale);
  {
    py::gil_scoped_release release;
    prism::compressed_attention_f32(p, prism::active_isa());
  }
  return out;
}

py::array_t<float> masked_softmax(const py::object& scores_obj, const py::object& counts_obj,
                                  const py::object& q_pos_obj, const py::object& k_pos_obj,
                                  const py::object& mask_obj, const py::object& out_obj) {
  auto scores = checked<float>(scores_obj, "scores", -1);
  const py::ssize_t nd = scores.ndim();
  if (nd < 2 || nd > 10) fail("scores: expected 2 to 10 dimensions, got shape " + shape_str(scores));
  if (!is_c_contiguous(scores)) fail("scores: must be C-contiguous");
  const int64_t nq = scores.shape(nd - 2), nk = scores.shape(nd - 1);
  if (scores.size() == 0) fail("scores: must not be empty, got shape " + shape_str(scores));
  const int64_t B = nd > 2 ? scores.shape(0) : 1;
  int64_t counts_batches = 1, qpos_batches = 1, kpos_batches = 1;
  auto counts = side_input<float>(counts_obj, "counts", B, nk, &counts_batches);
  auto q_pos = side_input<int32_t>(q_pos_obj, "q_pos", B, nq, &qpos_batches);
  auto k_pos = side_input<int32_t>(k_pos_obj, "k_pos", B, nk, &kpos_batches);
  if (q_pos.has_value() != k_pos.has_value()) fail("q_pos: q_pos and k_pos must be given together");
  if (q_pos && qpos_batches != kpos_batches) fail("k_pos: must have the same batch size as q_pos");
  // The additive mask broadcasts to scores (numpy rules): stride 0 along
  // missing or size-1 dimensions, so no broadcast copy is ever made.
  std::optional<py::array_t<float>> mask;
  int64_t mask_strides[10] = {0};
  if (!mask_obj.is_none()) {
    mask = checked<float>(mask_obj, "additive_mask", -1);
    const py::ssize_t md = mask->ndim();
    bool ok = md <= nd;
    for (py::ssize_t i = 0; ok && i < md; ++i) {
      const py::ssize_t si = nd - md + i;
      if (mask->shape(i) == scores.shape(si)) {
        mask_strides[si] = mask->shape(i) == 1 ? 0 : elem_stride(*mask, i);
      } else {
        ok = mask->shape(i) == 1;  // broadcast: stride stays 0
      }
    }
    if (!ok) fail("additive_mask: shape " + shape_str(*mask) + " does not broadcast to scores " + shape_str(scores));
  }
  py::array_t<float> out;
  if (out_obj.is_none()) {
    out = py::array_t<float>(std::vector<py::ssize_t>(scores.shape(), scores.shape() + nd));
  } else {
    out = checked<float>(out_obj, "out", nd);
    if (!is_c_contiguous(out)) fail("out: must be C-contiguous");
    for (py::ssize_t i = 0; i < nd; ++i)
      if (out.shape(i) != scores.shape(i)) fail("out: expected shape " + shape_str(scores) + ", got " + shape_str(out));
    if (!py::reinterpret_borrow<py::array>(out_obj).writeable()) fail("out: must be writeable");
    // Rows are read and written in one pass: out may be scores exactly (the
    // same row is read before it is written) but must not otherwise share
    // memory with an input, or later rows would read earlier results.
    const bool same = out.data() == scores.data();  // both C-contiguous, same shape
    if (!same && overlaps(out, scores))
      fail("out: overlaps scores partially; pass out=scores for an in-place softmax, or a separate array");
    if (mask && overlaps(out, *mask)) fail("out: overlaps additive_mask; pass a separate array");
    if ((q_pos && overlaps(out, *q_pos)) || (k_pos && overlaps(out, *k_pos)))
      fail("out: overlaps q_pos or k_pos; pass a separate array");
  }
  prism::SoftmaxProblem p{};
  p.scores = scores.data();
  p.out = out.mutable_data();
  p.counts = counts ? counts->data() : nullptr;
  p.q_pos = q_pos ? q_pos->data() : nullptr;
  p.k_pos = k_pos ? k_pos->data() : nullptr;
  p.add_mask = mask ? mask->data() : nullptr;
  p.lead_ndim = nd - 2;
  for (py::ssize_t i = 0; i < nd - 2; ++i) p.lead[i] = scores.shape(i);
  for (py::ssize_t i = 0; i < nd; ++i) p.mask_strides[i] = mask_strides[i];
  p.nq = nq;
  p.nk = nk;
  p.counts_batches = counts_batches;
  p.pos_batches = qpos_batches;
  {
    py::gil_scoped_release release;
    prism::masked_softmax_f32(p, prism::active_isa());
  }
  return out;
}

Isa isa_arg(const std::string& name) {
  try {
    return prism::isa_from_name(name);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "prism_ext kernels (float32): segment means, compressed attention, masked softmax";
  // C++ argument errors (std::invalid_argument) become ValueError.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("segment_means", &segment_means, py::arg("x"), py::arg("seg"), py::arg("valid") = py::none());
  m.def("compressed_attention", &compressed_attention, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("counts") = py::none(), py::arg("q_pos") = py::none(), py::arg("k_pos") = py::none(),
        py::arg("scale") = 1.0);
  m.def("masked_softmax", &masked_softmax, py::arg("scores"), py::arg("counts") = py::none(),
        py::arg("q_pos") = py::none(), py::arg("k_pos") = py::none(), py::arg("additive_mask") = py::none(),
        py::arg("out") = py::none());
  m.def("available_isas", [] {
    std::vector<std::string> names;
    for (Isa isa : prism::available_isas()) names.emplace_back(prism::isa_name(isa));
    return names;
  });
  m.def("active_isa", [] { return std::string(prism::isa_name(prism::active_isa())); });
  m.def("dispatched_isas", [] {
    py::dict d;
    for (auto [name, kernel] : {std::pair{"segment_means", prism::Kernel::segment_means},
                                std::pair{"compressed_attention", prism::Kernel::compressed_attention},
                                std::pair{"masked_softmax", prism::Kernel::masked_softmax}}) {
      const int isa = prism::last_dispatched_isa(kernel);
      d[name] = isa < 0 ? py::object(py::none()) : py::object(py::str(prism::isa_name(static_cast<Isa>(isa))));
    }
    return d;
  });
  m.def("forced_isa", []() -> std::optional<std::string> {
    if (!prism::isa_is_forced()) return std::nullopt;
    return std::string(prism::isa_name(prism::active_isa()));
  });
  m.def("force_isa", [](const std::optional<std::string>& name) {
    if (!name) return prism::clear_forced_isa();
    const Isa isa = isa_arg(*name);
    if (!prism::isa_available(isa))
      throw py::value_error("name: ISA '" + *name + "' is not available here (available: " +
                            [] {
                              std::string s;
                              for (Isa i : prism::available_isas()) s += (s.empty() ? "" : ", ") + std::string(prism::isa_name(i));
                              return s;
                            }() + ")");
    prism::force_isa(isa);
  }, py::arg("name"));
  m.def("cpu_features", [] {
    const auto& f = prism::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["avx512f"] = f.avx512f;
    d["os_avx"] = f.os_avx; d["os_avx512"] = f.os_avx512; d["neon"] = f.neon;
    return d;
  });
  m.def("get_num_threads", &prism::num_threads);
  m.def("max_threads", &prism::max_threads);
  // Takes any object so a huge or non-int n gets one clear line, not
  // pybind11's list of overloads.
  m.def("set_num_threads", [](const py::object& obj) {
    if (!py::isinstance<py::int_>(obj) || py::isinstance<py::bool_>(obj))
      throw py::type_error("n: expected an int, got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
    const int max = prism::max_threads();
    if (obj < py::int_(1) || obj > py::int_(max))
      throw py::value_error("n: thread count must be in [1, " + std::to_string(max) + "], got " +
                            std::string(py::str(obj)));
    const int n = obj.cast<int>();
    py::gil_scoped_release release;  // joining and starting threads can take a while
    prism::set_num_threads(n);
  }, py::arg("n"));
}
