// The Python module gptkernels._C. Loading it runs the TORCH_LIBRARY_FRAGMENT registrations of every op in
// csrc/ops (each op file declares its own schemas, so one stem's layers stay together); this file only reports
// what the build contains.
#include <pybind11/pybind11.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef GPTKERNELS_WITH_CUDA
#include "kernels/cuda/probe.cuh"
#endif

#ifndef GPTKERNELS_CUDA_ARCHS
#define GPTKERNELS_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict d;
#ifdef GPTKERNELS_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(GPTKERNELS_CUDA_ARCHS);
  d["cuda_runtime_version"] = gptkernels::cuda_compiled_runtime_version();
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
  d["cuda_runtime_version"] = 0;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_max_threads"] = 1;
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  return d;
}

py::tuple cuda_probe(int device) {
#ifdef GPTKERNELS_WITH_CUDA
  const char* msg = nullptr;
  const int code = gptkernels::cuda_probe_device(device, &msg);
  return py::make_tuple(code, std::string(msg ? msg : ""));
#else
  (void)device;
  return py::make_tuple(-1, std::string("built without CUDA"));
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gptkernels C++/CUDA extension: op registrations and build information";
  m.def("build_info", &build_info, "What this build of the extension contains.");
  m.def("cuda_probe", &cuda_probe, py::arg("device"),
        "(code, message): code 0 when this build's CUDA kernels can load on the device.");
}
