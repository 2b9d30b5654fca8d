"""Declare the packages and the Cython extensions, and build them with the compiler's OpenMP flags.

All metadata lives in ``pyproject.toml``. The packages are ``memoa_fast``, every
subpackage of it, and ``kernels/`` installed as ``memoa_fast.kernels`` (the
mapping is ``package-dir`` in ``pyproject.toml``). Every ``kernels/<stem>.pyx``
becomes the extension ``memoa_fast.kernels.<stem>``.

OpenMP: the build tries, with the compiler in use, to compile and link a tiny
OpenMP program with each candidate set of flags, and keeps the first that works:

- GCC and LLVM clang (Linux, MinGW): ``-fopenmp``;
- Apple clang (macOS): ``-Xpreprocessor -fopenmp`` with ``-lomp`` from Homebrew's
  ``libomp`` (``brew --prefix libomp``, ``/opt/homebrew/opt/libomp`` or
  ``/usr/local/opt/libomp``), found only if it is installed (``brew install libomp``);
- MSVC (Windows): ``/openmp``.

If none works, or if the environment sets ``MEMOA_FAST_NO_OPENMP=1``, the
extensions are built serially: ``prange`` loops run on one thread and
``omp_get_max_threads()`` is a stub returning 1 (a generated ``omp.h``), and
the build prints a notice saying so.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

KERNELS = Path("kernels")
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
}

OPENMP_PROBE = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    printf("%d %d\n", n, omp_get_max_threads());
    return 0;
}
"""

# Serial build: the OpenMP runtime functions the kernels may call, as one-thread stubs.
# Cython guards its own OpenMP code with `#ifdef _OPENMP`; only `cimport openmp` calls reach these.
SERIAL_OMP_H = """\
/* memoa-fast serial build (no OpenMP): one-thread stand-ins for the OpenMP runtime. */
#ifndef MEMOA_FAST_SERIAL_OMP_H
#define MEMOA_FAST_SERIAL_OMP_H
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_procs(void) { return 1; }
static inline int omp_in_parallel(void) { return 0; }
static inline void omp_set_num_threads(int n) { (void)n; }
static inline void omp_set_dynamic(int n) { (void)n; }
static inline int omp_get_dynamic(void) { return 0; }
#endif
"""


def extensions() -> list[Extension]:
    """One extension ``memoa_fast.kernels.<stem>`` per ``kernels/<stem>.pyx``."""
    return [
        Extension(
            f"memoa_fast.kernels.{pyx.stem}",
            [pyx.as_posix()],
        )
        for pyx in sorted(KERNELS.glob("*.pyx"))
    ]


def _libomp_prefixes() -> list[str]:
    """Homebrew's libomp prefixes that exist on this Mac (``brew --prefix libomp`` first)."""
    found = []
    if shutil.which("brew"):
        try:
            out = subprocess.run(["brew", "--prefix", "libomp"], capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip():
                found.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    found += ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
    return [p for i, p in enumerate(found) if p not in found[:i] and Path(p, "include", "omp.h").is_file()]


def openmp_candidates(compiler_type: str) -> list[tuple[str, list[str], list[str], list[str]]]:
    """``(name, compile args, link args, include dirs)`` to try, in order, for this compiler."""
    if compiler_type == "msvc":
        return [("MSVC /openmp", ["/openmp"], [], [])]
    out = []
    if sys.platform == "darwin":  # Apple clang has no -fopenmp driver flag, but takes libomp this way
        for prefix in _libomp_prefixes():
            out.append((f"Apple clang + libomp ({prefix})", ["-Xpreprocessor", "-fopenmp"],
                        [f"-L{prefix}/lib", "-lomp", f"-Wl,-rpath,{prefix}/lib"], [f"{prefix}/include"]))
    out.append(("-fopenmp", ["-fopenmp"], ["-fopenmp"], []))
    return out


class BuildExt(build_ext):
    """``build_ext`` that cythonizes the kernels and picks OpenMP flags that work with this compiler."""

    def _probe(self, compile_args, link_args, include_dirs) -> bool:
        """Whether the OpenMP probe compiles and links with these flags."""
        with tempfile.TemporaryDirectory(prefix="memoa-openmp-") as tmp:
            src = Path(tmp, "probe.c")
            src.write_text(OPENMP_PROBE)
            try:
                objects = self.compiler.compile([str(src)], output_dir=tmp, include_dirs=include_dirs,
                                                extra_postargs=compile_args)
                self.compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=link_args)
            except Exception:  # CompileError, LinkError, or a compiler that is missing altogether
                return False
        return True

    def build_extensions(self):
        """Choose the OpenMP flags (or the serial build), then cythonize and compile every extension."""
        from Cython.Build import cythonize

        for ext in self.extensions:  # .pyx -> .c beside it; the Extension objects stay setuptools' own
            ext.sources = cythonize([ext], compiler_directives=DIRECTIVES, quiet=True)[0].sources

        ctype = self.compiler.compiler_type
        # -g0 after Python's own CFLAGS (which hold -g): the debug info was 85% of the object file (3.6 MB of 4.2) and
        # 10-15% of the compile, and changes no instruction.
        optimise = ["/O2"] if ctype == "msvc" else ["-O3", "-g0"]
        chosen = None
        if os.environ.get("MEMOA_FAST_NO_OPENMP", "") not in ("", "0"):
            reason = "MEMOA_FAST_NO_OPENMP is set"
        else:
            reason = f"no OpenMP flags worked with the {ctype} compiler"
            for candidate in openmp_candidates(ctype):
                print(f"memoa-fast: trying OpenMP flags: {candidate[0]}")
                if self._probe(*candidate[1:]):
                    chosen = candidate
                    break
        serial_dirs = []
        if chosen is None:
            stub = Path(self.build_temp, "serial_omp")
            stub.mkdir(parents=True, exist_ok=True)
            (stub / "omp.h").write_text(SERIAL_OMP_H)
            serial_dirs = [str(stub)]
            bar = "=" * 78
            print(f"{bar}\nmemoa-fast: building the Cython kernels WITHOUT OpenMP ({reason}).\n"
                  "The extension works, but its parallel loops run on one thread.\n"
                  "For threads: Linux, install GCC or clang with OpenMP (libgomp / libomp); macOS, "
                  "`brew install libomp`;\nWindows, use MSVC. Then reinstall.\n" + bar, file=sys.stderr)
        else:
            print(f"memoa-fast: OpenMP flags: {chosen[0]}")
        for ext in self.extensions:
            ext.include_dirs = serial_dirs + ext.include_dirs
            if chosen is not None:
                ext.include_dirs += chosen[3]
                ext.extra_compile_args = optimise + chosen[1]
                ext.extra_link_args = list(chosen[2])
            else:
                ext.extra_compile_args = list(optimise)
        super().build_extensions()


setup(
    packages=[*find_packages(include=["memoa_fast", "memoa_fast.*"]), "memoa_fast.kernels"],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
)
