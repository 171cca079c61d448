"""Builds the optional C++ CPU extension ``rlhf_fast._C`` from csrc/ with plain pybind11.

No torch headers: kernels take raw data pointers and sizes (a file compiles in seconds,
and the build never needs torch). A failed build does not fail the install; the pure-torch
fallback then serves, and ``make test`` reports the missing extension unless RLHF_FAST_NO_EXT=1.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pybind11 missing at build time: install still succeeds, torch fallback.
    Pybind11Extension = None


class OptionalBuildExt(build_ext):
    """Build the extension if possible; warn (never fail) otherwise."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure degrades to torch
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        sys.stderr.write(
            f"\nWARNING: rlhf_fast C++ extension was not built ({exc}).\n"
            "rlhf_fast will use its pure-torch CPU fallback.\n\n"
        )


ext_modules = []
if Pybind11Extension is not None:
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    ext_modules.append(
        Pybind11Extension(
            "rlhf_fast._C",
            sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
            cxx_std=17,
            extra_compile_args=["-O3", *openmp],
            extra_link_args=openmp,
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
