// bind.h: helpers for the kernel families' pybind11 bindings.
//
// Contract for a kernel family <f> (csrc/<f>/): csrc/<f>/bind.cpp defines
//   namespace kernelrl { void bind_<f>(pybind11::module_& m); }
// CMake finds every csrc/*/bind.cpp, compiles it into kernelrl._native and lists the family in
// the generated header kernelrl_families.inc, through which bindings.cpp declares and calls
// bind_<f>. Adding a family therefore edits no shared file.
//
// def_kernel(m, name, &fn, args(...), doc) binds a torch-free entry point `void fn(P...)` as the
// Python function `name`, one argument name per parameter, converting each parameter from Python:
//   any pointer T* (buffers, and the CUDA stream)  <- int (tensor.data_ptr(), cudaStream_t as int)
//   DType                                          <- int dtype code; a bad code raises ValueError
//                                                     "<name>: <argument>: expected ..."
//   anything else (int64_t, float, bool)           <- as pybind11 converts it
// The GIL is released while fn runs. C++ exceptions map as pybind11 maps them:
// std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
//
// KERNELRL_DEF_CUDA(m, name, fn, args, doc) binds a CUDA entry point, which by convention takes
// the arguments of its CPU twin (the same args(...)) plus a trailing `void* stream`. It is bound
// in every build, so Python code can always look `<f>_<step>_cuda` up by attribute: in a build
// without the CUDA part (no KERNELRL_WITH_CUDA) it binds a function with the same arguments that
// raises RuntimeError(kNoCudaMessage) without touching fn, which is then not even linked.
#pragma once

#include <pybind11/pybind11.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/dtype.h"

namespace kernelrl {
namespace bind {

inline constexpr const char* kNoCudaMessage =
    "kernelrl._native was built without CUDA kernels (nvcc was not found at install, or "
    "KERNELRL_BUILD_CUDA=0)";

// Python argument names, one per C++ parameter.
template <std::size_t N>
using ArgNames = std::array<const char*, N>;

template <class... Name>
constexpr ArgNames<sizeof...(Name)> args(Name... names) {
  return {names...};
}

// The CUDA twin's names: the CPU twin's plus "stream".
template <std::size_t N>
constexpr ArgNames<N + 1> with_stream(const ArgNames<N>& names) {
  ArgNames<N + 1> out{};
  for (std::size_t i = 0; i < N; ++i) out[i] = names[i];
  out[N] = "stream";
  return out;
}

// Appends a family's section to the module docstring.
inline void append_doc(pybind11::module_& m, const char* text) {
  m.attr("__doc__") = m.attr("__doc__").cast<std::string>() + "\n" + text;
}

// ---- parameter conversion ------------------------------------------------------------------

template <class P>
struct PyArg {  // passed through
  using type = P;
  static P from(type v, const char*, const char*) { return v; }
};

template <class T>
struct PyArg<T*> {
  using type = std::uintptr_t;
  static T* from(type v, const char*, const char*) { return reinterpret_cast<T*>(v); }
};

template <>
struct PyArg<DType> {
  using type = int64_t;
  static DType from(type code, const char* fn, const char* arg) {
    return dtype_from_code(code, fn, arg);
  }
};

namespace detail {

// `name` is the Python name of the function (a string literal: it outlives the module).
template <class... P, std::size_t... I>
auto converting(void (*fn)(P...), const char* name, const ArgNames<sizeof...(P)>& names,
                std::index_sequence<I...>) {
  return [fn, name, names](typename PyArg<P>::type... v) {
    fn(PyArg<P>::from(v, name, names[I])...);
  };
}

template <class... P>
auto raising(void (*)(P...), const char* message) {
  return [message](typename PyArg<P>::type...) { throw std::runtime_error(message); };
}

template <class F, std::size_t N, std::size_t... I>
void def_named(pybind11::module_& m, const char* name, F&& f, const ArgNames<N>& names,
               const char* doc, std::index_sequence<I...>) {
  m.def(name, std::forward<F>(f), pybind11::call_guard<pybind11::gil_scoped_release>(),
        pybind11::arg(names[I])..., doc);
}

}  // namespace detail

template <class... P, std::size_t N>
void def_kernel(pybind11::module_& m, const char* name, void (*fn)(P...),
                const ArgNames<N>& names, const char* doc) {
  static_assert(N == sizeof...(P), "def_kernel: give one argument name per parameter");
  detail::def_named(m, name, detail::converting(fn, name, names, std::make_index_sequence<N>{}),
                    names, doc, std::make_index_sequence<N>{});
}

// What KERNELRL_DEF_CUDA binds without the CUDA part. `signature` is a null pointer that only
// carries the entry point's type.
template <class... P, std::size_t N>
void def_unavailable(pybind11::module_& m, const char* name, void (*signature)(P...),
                     const ArgNames<N>& names, const char* doc) {
  static_assert(N == sizeof...(P), "KERNELRL_DEF_CUDA: give one argument name per parameter");
  const std::string note = std::string(doc) + " Not in this build: raises RuntimeError.";
  detail::def_named(m, name, detail::raising(signature, kNoCudaMessage), names, note.c_str(),
                    std::make_index_sequence<N>{});
}

}  // namespace bind
}  // namespace kernelrl

// A macro, not a function: without the CUDA part, fn must not be odr-used (it is not defined
// anywhere), so only its type is taken, in decltype's unevaluated context.
#ifdef KERNELRL_WITH_CUDA
#define KERNELRL_DEF_CUDA(m, name, fn, args, doc) \
  ::kernelrl::bind::def_kernel((m), (name), &(fn), ::kernelrl::bind::with_stream(args), (doc))
#else
#define KERNELRL_DEF_CUDA(m, name, fn, args, doc)                                        \
  ::kernelrl::bind::def_unavailable((m), (name), static_cast<decltype(&(fn))>(nullptr), \
                                    ::kernelrl::bind::with_stream(args), (doc))
#endif
