"""Builds gptkernels._C: the C++ CPU kernels always, the CUDA kernels whenever nvcc and a CUDA build of torch exist.

Environment:
  GPTKERNELS_CUDA=0|1        0 skips the CUDA sources; 1 requires them (the build fails without nvcc or CUDA torch).
                             Unset: build them when possible and say so either way.
  TORCH_CUDA_ARCH_LIST       target archs, default "8.0;9.0" (sm_80, sm_90).
  MAX_JOBS                   parallel compile jobs (ninja).
"""

import glob
import os
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def log(msg):
    print(f"[gptkernels setup] {msg}", file=sys.stderr)


def version():
    with open(os.path.join(ROOT, "gptkernels", "_version.py")) as f:
        scope = {}
        exec(f.read(), scope)
        return scope["__version__"]


def nvidia_include_dirs():
    """Headers of pip's CUDA packages (cusparse.h, cublas_v2.h, ...) that torch's CUDA headers include."""
    dirs = []
    try:
        import nvidia

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))  # CUDA 13 wheels: nvidia/cu13/include
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))  # CUDA 12 wheels: nvidia/<lib>/include
    except ImportError:
        pass
    return [d for i, d in enumerate(dirs) if d not in dirs[:i]]


def cublaslt_library(cuda_home):
    """Path of the libcublasLt that torch loads (pip's nvidia wheels first, then the toolkit), or None.

    csrc/ops/mlp.cpp calls cuBLASLt directly (the GEMM epilogues of fused_mlp). Pip wheels ship only the versioned
    libcublasLt.so.N, which `-lcublasLt` cannot find, so the file itself goes on the link line (its SONAME is what
    gets recorded; at run time torch has already loaded that library).
    """
    cands = []
    try:
        import nvidia

        for base in nvidia.__path__:
            cands += sorted(glob.glob(os.path.join(base, "cu*", "lib", "libcublasLt.so*")))  # CUDA 13 wheels
            cands += sorted(glob.glob(os.path.join(base, "cublas", "lib", "libcublasLt.so*")))  # CUDA 12 wheels
    except ImportError:
        pass
    if cuda_home:
        cands += sorted(glob.glob(os.path.join(cuda_home, "lib64", "libcublasLt.so*")))
    return cands[0] if cands else None


def find_cuda_home():
    """CUDA_HOME for torch.utils.cpp_extension, which must be set before that module is imported.

    cpp_extension guesses it from `which nvcc`; a wrapper script such as /usr/local/bin/nvcc would make it guess
    /usr/local. Prefer an explicit CUDA_HOME/CUDA_PATH, then /usr/local/cuda, then the guess.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return
    for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")) and os.path.exists(os.path.join(cand, "include")):
            os.environ["CUDA_HOME"] = cand
            return


def want_cuda(torch, cpp_extension):
    flag = os.environ.get("GPTKERNELS_CUDA", "").strip()
    if flag == "0":
        return False, "GPTKERNELS_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        reasons.append("nvcc not found (set CUDA_HOME)")
    if reasons:
        if flag == "1":
            raise RuntimeError("GPTKERNELS_CUDA=1 but CUDA cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"nvcc in {cpp_extension.CUDA_HOME}, torch CUDA {torch.version.cuda}"


def extensions():
    find_cuda_home()
    import torch
    from torch.utils import cpp_extension

    with_cuda, why = want_cuda(torch, cpp_extension)
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/ops/*.cpp")) + sorted(glob.glob("csrc/kernels/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # torch.utils.cpp_extension picks the C++ standard torch needs (C++20 for 2.14)
    # The reason travels into the build, so `python -m gptkernels info` can say why CUDA is in or out (pip hides
    # this script's output unless run with -v).
    define_macros = [("GPTKERNELS_CUDA_WHY", '"' + why.replace("\\", "/").replace('"', "'") + '"')]
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = {}
    link_args = ["-fopenmp"]
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch.utils.cpp_extension
        sources += sorted(glob.glob("csrc/kernels/cuda/*.cu"))
        define_macros += [("GPTKERNELS_WITH_CUDA", None), ("GPTKERNELS_CUDA_ARCHS", f'"{archs}"')]
        # -idirafter: searched after the toolkit's own include dir, so pip's partial copies of cuda_runtime.h etc.
        # never shadow nvcc's; only headers the toolkit lacks (cusparse.h, ...) come from there. The .cu files
        # include no torch headers, so nvcc needs none of these.
        for d in nvidia_include_dirs():
            cxx += ["-idirafter", d]
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}
        lt = cublaslt_library(cpp_extension.CUDA_HOME)
        if lt:
            link_args.append(lt)
            log(f"linking cuBLASLt: {lt}")
        else:  # the symbols then resolve through libtorch_cuda's own dependency on it
            log("libcublasLt not found on disk; relying on torch's copy at load time")
        ext_cls = cpp_extension.CUDAExtension
        log(f"building CPU + CUDA kernels for archs {archs} ({why})")
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = cpp_extension.CppExtension
        log(f"building CPU kernels only; CUDA skipped: {why}")
    ext = ext_cls(
        name="gptkernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=link_args,
        **kwargs,
    )
    return [ext], persistent_build_dir(cpp_extension.BuildExtension).with_options(use_ninja=True)


def persistent_build_dir(base):
    """build_ext whose objects and ninja state live in ./build, not in a temporary folder.

    `pip install -e .` builds in a fresh temporary directory each time, so every reinstall recompiled everything
    (about 3 minutes on 2 cores). With a fixed folder, ninja recompiles only the sources (and headers) that changed
    and relinks; a changed compiler command line (another torch, GPTKERNELS_CUDA) also triggers a recompile.
    """

    class BuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = os.path.join(ROOT, "build", f"temp.{tag}")

    return BuildExt


ext_modules, build_ext = extensions()

setup(
    name="gptkernels",
    version=version(),
    packages=find_packages(include=["gptkernels", "gptkernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
