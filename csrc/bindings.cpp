// pybind11 module prism_ext._C. Takes numpy arrays or torch CPU tensors of the
// exact dtypes the kernels read (prism_ext.kernels converts anything else),
// returns the kind it was given, validates every argument so bad input raises
// instead of crashing, and releases the GIL while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>
#include <stdexcept>
#include <string>
#include <tuple>

#include "isa.h"
#include "ops.h"
#include "threadpool.h"

namespace py = pybind11;
using prism::Isa;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void fail_type(const std::string& msg) { throw py::type_error(msg); }

// u8: uint8 or bool (masks); u8_exact: uint8 only (packed weights).
enum class Dt { f32, i32, u8, i8, u8_exact };
constexpr int kMaxDims = 10;

// torch objects the bindings compare against, looked up once (torch is
// imported by then: the caller holds a tensor). No libtorch link: a tensor is
// read through its Python attributes, which costs less than a numpy view.
struct Torch {
  py::object tensor_type, from_numpy, f32, i32, u8, i8, bool_, strided;
  // Attribute names, interned once: a fresh name string per lookup misses
  // CPython's type attribute cache and walks Tensor's MRO every time.
  py::object dtype, is_cpu, layout, is_neg, shape, stride, data_ptr;
};

py::object interned(const char* s) { return py::reinterpret_steal<py::object>(PyUnicode_InternFromString(s)); }
const Torch* torch_if_loaded() {
  static const Torch* t = nullptr;
  if (t) return t;
  py::object modules = py::module_::import("sys").attr("modules");
  if (!modules.contains("torch")) return nullptr;
  py::object torch = modules["torch"];
  t = new Torch{torch.attr("Tensor"), torch.attr("from_numpy"), torch.attr("float32"), torch.attr("int32"),
                torch.attr("uint8"), torch.attr("int8"), torch.attr("bool"), torch.attr("strided"), interned("dtype"),
                interned("is_cpu"), interned("layout"), interned("is_neg"), interned("shape"), interned("stride"),
                interned("data_ptr")};
  return t;
}

bool is_tensor(const py::handle& obj) {
  const Torch* t = torch_if_loaded();
  return t && PyObject_IsInstance(obj.ptr(), t->tensor_type.ptr()) == 1;
}

// A strided array as the kernels read it, from a numpy array or a torch CPU
// tensor: exactly the dtype asked for (no conversion), strides in elements,
// non-negative, the last dimension contiguous.
struct Arr {
  py::object owner;  // keeps the memory alive during the call
  char* data = nullptr;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // elements
  int64_t itemsize = 4;
  bool torch = false;
  bool writeable = true;

  int64_t size() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  template <typename T>
  T* ptr() const { return reinterpret_cast<T*>(data); }
  bool c_contiguous() const {
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  std::string shape_str() const {
    std::string s = "(";
    for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (ndim == 1 ? ",)" : ")");
  }
};

const char* dt_name(Dt dt) {
  switch (dt) {
    case Dt::f32: return "float32";
    case Dt::i32: return "int32";
    case Dt::u8: return "uint8 or bool";
    case Dt::i8: return "int8";
    case Dt::u8_exact: return "uint8";
  }
  return "?";
}

int64_t dt_size(Dt dt) { return dt == Dt::f32 || dt == Dt::i32 ? 4 : 1; }

Arr from_numpy(const py::handle& obj, const char* name, Dt dt) {
  auto a = py::reinterpret_borrow<py::array>(obj);
  const bool ok = dt == Dt::f32        ? a.dtype().is(py::dtype::of<float>())
                  : dt == Dt::i32      ? a.dtype().is(py::dtype::of<int32_t>())
                  : dt == Dt::i8       ? a.dtype().is(py::dtype::of<int8_t>())
                  : dt == Dt::u8_exact ? a.dtype().is(py::dtype::of<uint8_t>())
                                       : a.dtype().is(py::dtype::of<uint8_t>()) || a.dtype().is(py::dtype::of<bool>());
  if (!ok)
    fail_type(std::string(name) + ": expected dtype " + dt_name(dt) + ", got " + std::string(py::str(a.dtype())));
  if (a.ndim() > kMaxDims) fail(std::string(name) + ": at most " + std::to_string(kMaxDims) + " dimensions");
  Arr r;
  r.owner = a;
  r.data = static_cast<char*>(const_cast<void*>(a.data()));
  r.ndim = static_cast<int>(a.ndim());
  r.itemsize = a.itemsize();
  r.writeable = a.writeable();
  for (int i = 0; i < r.ndim; ++i) {
    r.shape[i] = a.shape(i);
    const py::ssize_t st = a.strides(i);
    if (st < 0 || st % r.itemsize != 0) fail(std::string(name) + ": strides must be non-negative whole elements");
    r.strides[i] = st / r.itemsize;
  }
  return r;
}

Arr from_tensor(const py::handle& obj, const char* name, Dt dt, const Torch& t) {
  py::object dtype = obj.attr(t.dtype);
  const bool ok = dt == Dt::f32        ? dtype.is(t.f32)
                  : dt == Dt::i32      ? dtype.is(t.i32)
                  : dt == Dt::i8       ? dtype.is(t.i8)
                  : dt == Dt::u8_exact ? dtype.is(t.u8)
                                       : dtype.is(t.u8) || dtype.is(t.bool_);
  if (!ok) fail_type(std::string(name) + ": expected dtype " + dt_name(dt) + ", got " + std::string(py::str(dtype)));
  if (!obj.attr(t.is_cpu).cast<bool>())
    fail_type(std::string(name) + ": expected a CPU tensor, got a tensor on " + std::string(py::str(obj.attr("device"))));
  py::object layout = obj.attr(t.layout);
  if (!layout.is(t.strided))
    fail_type(std::string(name) + ": expected a dense (strided) tensor, got layout " + std::string(py::str(layout)));
  if (obj.attr(t.is_neg)().cast<bool>()) fail(std::string(name) + ": must not be a lazily negated view");
  const py::tuple shape = obj.attr(t.shape);
  const py::tuple strides = obj.attr(t.stride)();
  Arr r;
  r.owner = py::reinterpret_borrow<py::object>(obj);
  r.torch = true;
  r.itemsize = dt_size(dt);
  r.ndim = static_cast<int>(PyTuple_GET_SIZE(shape.ptr()));
  if (r.ndim > kMaxDims) fail(std::string(name) + ": at most " + std::to_string(kMaxDims) + " dimensions");
  for (int i = 0; i < r.ndim; ++i) {
    r.shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), i));
    r.strides[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides.ptr(), i));
    if (r.strides[i] < 0) fail(std::string(name) + ": strides must be non-negative whole elements");
  }
  r.data = reinterpret_cast<char*>(PyLong_AsVoidPtr(obj.attr(t.data_ptr)().ptr()));
  return r;
}

// `obj` as an Arr of dtype dt and `ndim` dimensions (-1: any), the last one
// contiguous (or of size 1).
Arr checked(const py::handle& obj, const char* name, Dt dt, int ndim) {
  Arr r;
  if (py::isinstance<py::array>(obj)) {
    r = from_numpy(obj, name, dt);
  } else if (is_tensor(obj)) {
    r = from_tensor(obj, name, dt, *torch_if_loaded());
  } else {
    fail_type(std::string(name) + ": expected a numpy array or torch tensor");
  }
  if (ndim >= 0 && r.ndim != ndim)
    fail(std::string(name) + ": expected " + std::to_string(ndim) + " dimensions, got shape " + r.shape_str());
  if (r.ndim > 0 && !(r.strides[r.ndim - 1] == 1 || r.shape[r.ndim - 1] == 1))
    fail(std::string(name) + ": the last dimension must be contiguous");
  return r;
}

// A new C-contiguous float32 array of `shape`, as a torch tensor if `torch`:
// numpy's allocation plus torch.from_numpy costs half of torch.empty's
// argument parsing.
Arr new_output(bool torch, const std::vector<int64_t>& shape) {
  py::object obj = py::array_t<float>(std::vector<py::ssize_t>(shape.begin(), shape.end()));
  Arr out = from_numpy(obj, "out", Dt::f32);
  if (torch) {
    out.owner = torch_if_loaded()->from_numpy(obj);
    out.torch = true;
  }
  return out;
}

// Byte range [first, last) an array's elements span (not empty arrays).
std::pair<uintptr_t, uintptr_t> byte_extent(const Arr& a) {
  uintptr_t lo = reinterpret_cast<uintptr_t>(a.data), hi = lo;
  for (int i = 0; i < a.ndim; ++i) hi += static_cast<uintptr_t>((a.shape[i] - 1) * a.strides[i] * a.itemsize);
  return {lo, hi + a.itemsize};
}

bool overlaps(const Arr& a, const Arr& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const auto ea = byte_extent(a), eb = byte_extent(b);
  return ea.first < eb.second && eb.first < ea.second;
}

// (len,) or (batches, len) contiguous side input (counts, positions) with
// batches in {1, B}; *batches gets 1 or B.
std::optional<Arr> side_input(const py::handle& obj, const char* name, Dt dt, int64_t B, int64_t len,
                              int64_t* batches) {
  *batches = 1;
  if (obj.is_none()) return std::nullopt;
  Arr a = checked(obj, name, dt, -1);
  if (a.ndim == 1) {
    a.ndim = 2;
    a.shape[1] = a.shape[0];
    a.strides[1] = a.strides[0];
    a.shape[0] = 1;
    a.strides[0] = a.shape[1];
  }
  if (a.ndim != 2 || !a.c_contiguous() || !((a.shape[0] == 1 || a.shape[0] == B) && a.shape[1] == len))
    fail(std::string(name) + ": expected a C-contiguous array of shape (" + std::to_string(len) + ",), (1, " +
         std::to_string(len) + ") or (" + std::to_string(B) + ", " + std::to_string(len) + "), got " + a.shape_str());
  *batches = a.shape[0];
  return a;
}

// counts [nk], q_pos [nq], k_pos [nk], each also [1 or B, len]; the
// positions both or neither, with one batch size.
struct SideInputs {
  std::tuple<std::optional<Arr>, std::optional<Arr>, std::optional<Arr>> arrays;
  int64_t counts_batches = 1, pos_batches = 1;

  SideInputs(const py::handle& counts, const py::handle& q_pos, const py::handle& k_pos, int64_t B, int64_t nq,
             int64_t nk) {
    int64_t kpos_batches = 1;
    arrays = {side_input(counts, "counts", Dt::f32, B, nk, &counts_batches),
              side_input(q_pos, "q_pos", Dt::i32, B, nq, &pos_batches),
              side_input(k_pos, "k_pos", Dt::i32, B, nk, &kpos_batches)};
    if (std::get<1>(arrays).has_value() != std::get<2>(arrays).has_value())
      fail("q_pos: q_pos and k_pos must be given together");
    if (std::get<1>(arrays) && pos_batches != kpos_batches) fail("k_pos: must have the same batch size as q_pos");
  }
};

py::tuple segment_means(const py::handle& x_obj, const py::handle& seg_obj, const py::handle& valid_obj) {
  // x [n, d] or [L, n, d]; the outputs have x's rank.
  Arr x = checked(x_obj, "x", Dt::f32, -1);
  const bool flat = x.ndim == 2;
  if (flat) {
    x.ndim = 3;
    x.shape[2] = x.shape[1], x.strides[2] = x.strides[1];
    x.shape[1] = x.shape[0], x.strides[1] = x.strides[0];
    x.shape[0] = 1, x.strides[0] = 0;
  }
  if (x.ndim != 3) fail("x: expected 2 or 3 dimensions, got shape " + x.shape_str());
  if (PyBool_Check(seg_obj.ptr()) || !PyLong_Check(seg_obj.ptr())) fail_type("seg: expected an int");
  int overflow = 0;
  int64_t seg = PyLong_AsLongLongAndOverflow(seg_obj.ptr(), &overflow);
  if (overflow > 0) seg = INT64_MAX;  // longer than any x: one segment
  if (overflow < 0) seg = 0;
  if (seg < 1) fail("seg: must be >= 1, got " + std::to_string(seg));
  const int64_t L = x.shape[0], n = x.shape[1], d = x.shape[2];
  if (n < 1 || d < 1) fail("x: needs at least one row and one column, got shape " + x.shape_str());
  seg = std::min(seg, n);  // a longer segment is the whole row range; keeps the arithmetic in range
  std::optional<Arr> valid;
  if (!valid_obj.is_none()) {
    valid = checked(valid_obj, "valid", Dt::u8, flat ? 1 : 2);
    const bool ok = flat ? valid->shape[0] == n && (n == 1 || valid->strides[0] == 1)
                         : valid->c_contiguous() && valid->shape[0] == L && valid->shape[1] == n;
    if (!ok)
      fail("valid: expected a C-contiguous array of shape " +
           (flat ? "(" + std::to_string(n) + ",)" : "(" + std::to_string(L) + ", " + std::to_string(n) + ")") +
           ", got " + valid->shape_str());
  }
  const int64_t m = (n + seg - 1) / seg;
  const Arr means = flat ? new_output(x.torch, {m, d}) : new_output(x.torch, {L, m, d});
  const Arr counts = flat ? new_output(x.torch, {m}) : new_output(x.torch, {L, m});
  prism::SegmentMeansProblem p{x.ptr<float>(), valid ? valid->ptr<uint8_t>() : nullptr, means.ptr<float>(),
                               counts.ptr<float>(), L, n, d, seg, x.strides[0], x.strides[1]};
  {
    py::gil_scoped_release release;
    prism::segment_means_f32(p, prism::active_isa());
  }
  return py::make_tuple(means.owner, counts.owner);
}

py::object compressed_attention(const py::handle& q_obj, const py::handle& k_obj, const py::handle& v_obj,
                                const py::handle& counts_obj, const py::handle& q_pos_obj,
                                const py::handle& k_pos_obj, const py::handle& scale_obj) {
  const Arr q = checked(q_obj, "q", Dt::f32, 4);
  const Arr k = checked(k_obj, "k", Dt::f32, 4);
  const Arr v = checked(v_obj, "v", Dt::f32, 4);
  const int64_t B = q.shape[0], H = q.shape[1], nq = q.shape[2], dh = q.shape[3], nk = k.shape[2];
  if (B < 1 || H < 1 || nq < 1 || dh < 1) fail("q: every dimension must be >= 1, got shape " + q.shape_str());
  if (k.shape[0] != B || k.shape[1] != H || k.shape[3] != dh || nk < 1)
    fail("k: expected shape (" + std::to_string(B) + ", " + std::to_string(H) + ", nk >= 1, " + std::to_string(dh) +
         "), got " + k.shape_str());
  if (v.shape[0] != B || v.shape[1] != H || v.shape[2] != nk || v.shape[3] != dh)
    fail("v: expected the shape of k " + k.shape_str() + ", got " + v.shape_str());
  double scale = 1.0 / std::sqrt(static_cast<double>(dh));
  if (!scale_obj.is_none()) {
    if (PyBool_Check(scale_obj.ptr()) || !(PyFloat_Check(scale_obj.ptr()) || PyLong_Check(scale_obj.ptr())))
      fail_type("scale: expected a real number");
    scale = scale_obj.cast<double>();
  }
  if (!std::isfinite(scale)) fail("scale: must be finite");
  const SideInputs side(counts_obj, q_pos_obj, k_pos_obj, B, nq, nk);
  const auto& [counts, q_pos, k_pos] = side.arrays;
  const Arr out = new_output(q.torch, {B, H, nq, dh});
  prism::AttentionProblem p{};
  p.q = q.ptr<float>();
  p.k = k.ptr<float>();
  p.v = v.ptr<float>();
  p.out = out.ptr<float>();
  p.counts = counts ? counts->ptr<float>() : nullptr;
  p.q_pos = q_pos ? q_pos->ptr<int32_t>() : nullptr;
  p.k_pos = k_pos ? k_pos->ptr<int32_t>() : nullptr;
  p.B = B; p.H = H; p.nq = nq; p.nk = nk; p.dh = dh;
  p.counts_batches = side.counts_batches;
  p.pos_batches = side.pos_batches;
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = q.strides[i];
    p.k_strides[i] = k.strides[i];
    p.v_strides[i] = v.strides[i];
    p.out_strides[i] = out.strides[i];
  }
  p.scale = static_cast<float>(scale);
  {
    py::gil_scoped_release release;
    prism::compressed_attention_f32(p, prism::active_isa());
  }
  return out.owner;
}

py::object masked_softmax(const py::handle& scores_obj, const py::handle& counts_obj, const py::handle& q_pos_obj,
                          const py::handle& k_pos_obj, const py::handle& mask_obj, const py::handle& out_obj) {
  const Arr scores = checked(scores_obj, "scores", Dt::f32, -1);
  const int nd = scores.ndim;
  if (nd < 2 || nd > 10) fail("scores: expected 2 to 10 dimensions, got shape " + scores.shape_str());
  if (!scores.c_contiguous()) fail("scores: must be C-contiguous");
  const int64_t nq = scores.shape[nd - 2], nk = scores.shape[nd - 1];
  if (scores.size() == 0) fail("scores: must not be empty, got shape " + scores.shape_str());
  const int64_t B = nd > 2 ? scores.shape[0] : 1;
  const SideInputs side(counts_obj, q_pos_obj, k_pos_obj, B, nq, nk);
  const auto& [counts, q_pos, k_pos] = side.arrays;
  // The additive mask broadcasts to scores (numpy rules): stride 0 along
  // missing or size-1 dimensions, so no broadcast copy is ever made.
  std::optional<Arr> mask;
  int64_t mask_strides[10] = {0};
  if (!mask_obj.is_none()) {
    mask = checked(mask_obj, "additive_mask", Dt::f32, -1);
    const int md = mask->ndim;
    bool ok = md <= nd;
    for (int i = 0; ok && i < md; ++i) {
      const int si = nd - md + i;
      if (mask->shape[i] == scores.shape[si]) {
        mask_strides[si] = mask->shape[i] == 1 ? 0 : mask->strides[i];
      } else {
        ok = mask->shape[i] == 1;  // broadcast: stride stays 0
      }
    }
    if (!ok) fail("additive_mask: shape " + mask->shape_str() + " does not broadcast to scores " + scores.shape_str());
  }
  Arr out;
  if (out_obj.is_none()) {
    out = new_output(scores.torch, std::vector<int64_t>(scores.shape, scores.shape + nd));
  } else {
    out = checked(out_obj, "out", Dt::f32, nd);
    if (out.torch != scores.torch) fail_type("out: expected the type of scores (numpy array or torch tensor)");
    if (!out.c_contiguous()) fail("out: must be C-contiguous");
    for (int i = 0; i < nd; ++i)
      if (out.shape[i] != scores.shape[i]) fail("out: expected shape " + scores.shape_str() + ", got " + out.shape_str());
    if (!out.writeable) fail("out: must be writeable");
    // Rows are read and written in one pass: out may be scores exactly (the
    // same row is read before it is written) but must not otherwise share
    // memory with an input, or later rows would read earlier results.
    const bool same = out.data == scores.data;  // both C-contiguous, same shape
    if (!same && overlaps(out, scores))
      fail("out: overlaps scores partially; pass out=scores for an in-place softmax, or a separate array");
    if (mask && overlaps(out, *mask)) fail("out: overlaps additive_mask; pass a separate array");
    if ((q_pos && overlaps(out, *q_pos)) || (k_pos && overlaps(out, *k_pos)))
      fail("out: overlaps q_pos or k_pos; pass a separate array");
    if (counts && overlaps(out, *counts)) fail("out: overlaps counts; pass a separate array");
  }
  prism::SoftmaxProblem p{};
  p.scores = scores.ptr<float>();
  p.out = out.ptr<float>();
  p.counts = counts ? counts->ptr<float>() : nullptr;
  p.q_pos = q_pos ? q_pos->ptr<int32_t>() : nullptr;
  p.k_pos = k_pos ? k_pos->ptr<int32_t>() : nullptr;
  p.add_mask = mask ? mask->ptr<float>() : nullptr;
  p.lead_ndim = nd - 2;
  for (int i = 0; i < nd - 2; ++i) p.lead[i] = scores.shape[i];
  for (int i = 0; i < nd; ++i) p.mask_strides[i] = mask_strides[i];
  p.nq = nq;
  p.nk = nk;
  p.counts_batches = side.counts_batches;
  p.pos_batches = side.pos_batches;
  {
    py::gil_scoped_release release;
    prism::masked_softmax_f32(p, prism::active_isa());
  }
  return out.owner;
}

// ---- weight-only quantized linear layers (ops.h QuantProblem)

// A C-contiguous weight-side array of exactly `shape`.
Arr weight_arg(const py::handle& obj, const char* name, Dt dt, std::initializer_list<int64_t> shape) {
  Arr a = checked(obj, name, dt, static_cast<int>(shape.size()));
  bool same = true;
  int i = 0;
  for (int64_t s : shape) same &= a.shape[i++] == s;
  if (!same) {
    std::string want = "(";
    i = 0;
    for (int64_t s : shape) want += (i++ ? ", " : "") + std::to_string(s);
    fail(std::string(name) + ": expected shape " + want + (shape.size() == 1 ? ",)" : ")") + ", got " + a.shape_str());
  }
  if (!a.c_contiguous()) fail(std::string(name) + ": must be C-contiguous");
  return a;
}

int64_t group_arg(const py::handle& obj) {
  if (PyBool_Check(obj.ptr()) || !PyLong_Check(obj.ptr())) fail_type("group: expected an int");
  int overflow = 0;
  const int64_t g = PyLong_AsLongLongAndOverflow(obj.ptr(), &overflow);
  if (overflow) fail("group: out of range");
  return g;
}

std::optional<Arr> bias_arg(const py::handle& obj, int64_t N) {
  if (obj.is_none()) return std::nullopt;
  return weight_arg(obj, "bias", Dt::f32, {N});
}

// x [M, K] (rows at any stride), q [N, *], the problem filled but for the weights.
prism::QuantProblem linear_problem(const Arr& x, const Arr& q, const std::optional<Arr>& bias, const Arr& out) {
  prism::QuantProblem p{};
  p.x = x.ptr<float>();
  p.x_stride = x.strides[0];
  p.q = q.data;
  p.bias = bias ? bias->ptr<float>() : nullptr;
  p.out = out.ptr<float>();
  p.M = x.shape[0];
  p.N = q.shape[0];
  p.K = x.shape[1];
  return p;
}

void check_x(const Arr& x) {
  if (x.shape[1] < 1) fail("x: needs at least one column, got shape " + x.shape_str());
}

py::object int8_linear(const py::handle& x_obj, const py::handle& q_obj, const py::handle& scale_obj,
                       const py::handle& bias_obj) {
  const Arr x = checked(x_obj, "x", Dt::f32, 2);
  check_x(x);
  const Arr q0 = checked(q_obj, "q", Dt::i8, 2);
  const int64_t N = q0.shape[0], K = x.shape[1];
  if (N < 1) fail("q: needs at least one row, got shape " + q0.shape_str());
  const Arr q = weight_arg(q_obj, "q", Dt::i8, {N, K});
  const Arr scale = weight_arg(scale_obj, "scale", Dt::f32, {N});
  const std::optional<Arr> bias = bias_arg(bias_obj, N);
  const Arr out = new_output(x.torch, {x.shape[0], N});
  prism::QuantProblem p = linear_problem(x, q, bias, out);
  p.scale = scale.ptr<float>();
  {
    py::gil_scoped_release release;
    prism::int8_linear_f32(p, prism::active_isa());
  }
  return out.owner;
}

// int4 side inputs: group even dividing K, q [N, K / 2], scale/offset [N, K / group].
struct Int4Weights {
  Arr q, scale, offset;
  int64_t group;
  Int4Weights(const py::handle& q_obj, const py::handle& scale_obj, const py::handle& offset_obj,
              const py::handle& group_obj, int64_t K) {
    group = group_arg(group_obj);
    if (group < 2 || group % 2 != 0 || K % group != 0)
      fail("group: must be even and divide K = " + std::to_string(K) + ", got " + std::to_string(group));
    const Arr q0 = checked(q_obj, "q", Dt::u8_exact, 2);
    const int64_t N = q0.shape[0];
    if (N < 1) fail("q: needs at least one row, got shape " + q0.shape_str());
    q = weight_arg(q_obj, "q", Dt::u8_exact, {N, K / 2});
    scale = weight_arg(scale_obj, "scale", Dt::f32, {N, K / group});
    offset = weight_arg(offset_obj, "offset", Dt::f32, {N, K / group});
  }
  void fill(prism::QuantProblem& p) const {
    p.scale = scale.ptr<float>();
    p.offset = offset.ptr<float>();
    p.group = group;
  }
};

py::object int4_linear(const py::handle& x_obj, const py::handle& q_obj, const py::handle& scale_obj,
                       const py::handle& offset_obj, const py::handle& group_obj, const py::handle& bias_obj) {
  const Arr x = checked(x_obj, "x", Dt::f32, 2);
  check_x(x);
  const Int4Weights w(q_obj, scale_obj, offset_obj, group_obj, x.shape[1]);
  const int64_t N = w.q.shape[0];
  const std::optional<Arr> bias = bias_arg(bias_obj, N);
  const Arr out = new_output(x.torch, {x.shape[0], N});
  prism::QuantProblem p = linear_problem(x, w.q, bias, out);
  w.fill(p);
  {
    py::gil_scoped_release release;
    prism::int4_linear_f32(p, prism::active_isa());
  }
  return out.owner;
}

py::object int8_dequantize(const py::handle& q_obj, const py::handle& scale_obj) {
  const Arr q0 = checked(q_obj, "q", Dt::i8, 2);
  const int64_t N = q0.shape[0], K = q0.shape[1];
  if (N < 1 || K < 1) fail("q: needs at least one row and one column, got shape " + q0.shape_str());
  const Arr q = weight_arg(q_obj, "q", Dt::i8, {N, K});
  const Arr scale = weight_arg(scale_obj, "scale", Dt::f32, {N});
  const Arr out = new_output(q.torch, {N, K});
  prism::QuantProblem p{};
  p.q = q.data;
  p.scale = scale.ptr<float>();
  p.out = out.ptr<float>();
  p.N = N;
  p.K = K;
  {
    py::gil_scoped_release release;
    prism::int8_dequantize_f32(p, prism::active_isa());
  }
  return out.owner;
}

py::object int4_dequantize(const py::handle& q_obj, const py::handle& scale_obj, const py::handle& offset_obj,
                           const py::handle& group_obj) {
  const Arr q0 = checked(q_obj, "q", Dt::u8_exact, 2);
  const int64_t K = 2 * q0.shape[1];
  if (q0.shape[0] < 1 || K < 1) fail("q: needs at least one row and one column, got shape " + q0.shape_str());
  const Int4Weights w(q_obj, scale_obj, offset_obj, group_obj, K);
  const int64_t N = w.q.shape[0];
  const Arr out = new_output(w.q.torch, {N, K});
  prism::QuantProblem p{};
  p.q = w.q.data;
  w.fill(p);
  p.out = out.ptr<float>();
  p.N = N;
  p.K = K;
  {
    py::gil_scoped_release release;
    prism::int4_dequantize_f32(p, prism::active_isa());
  }
  return out.owner;
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
  m.doc() = "prism_ext kernels (float32): segment means, compressed attention, masked softmax, int8/int4 weight-only linear";
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
        py::arg("scale") = py::none());
  m.def("masked_softmax", &masked_softmax, py::arg("scores"), py::arg("counts") = py::none(),
        py::arg("q_pos") = py::none(), py::arg("k_pos") = py::none(), py::arg("additive_mask") = py::none(),
        py::arg("out") = py::none());
  m.def("int8_linear", &int8_linear, py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("bias") = py::none());
  m.def("int4_linear", &int4_linear, py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("offset"),
        py::arg("group"), py::arg("bias") = py::none());
  m.def("int8_dequantize", &int8_dequantize, py::arg("q"), py::arg("scale"));
  m.def("int4_dequantize", &int4_dequantize, py::arg("q"), py::arg("scale"), py::arg("offset"), py::arg("group"));
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
                                std::pair{"masked_softmax", prism::Kernel::masked_softmax},
                                std::pair{"int8_linear", prism::Kernel::int8_linear},
                                std::pair{"int4_linear", prism::Kernel::int4_linear},
                                std::pair{"int8_dequantize", prism::Kernel::int8_dequantize},
                                std::pair{"int4_dequantize", prism::Kernel::int4_dequantize}}) {
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
