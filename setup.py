"""Build cachefs._native from native/_native.pyx; metadata lives in setup.cfg.

The extension is optional: cachefs/_purepy.py has the same interface, so a
machine without Cython or a C compiler still gets a working install.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The distutils error classes, without importing distutils (gone in 3.12).
from setuptools.errors import CCompilerError, ExecError, PlatformError

BUILD_ERRORS = (CCompilerError, ExecError, PlatformError, OSError)


def warn(msg):
    print(f"WARNING: {msg}; cachefs will use the pure-Python hot path.", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext that downgrades compiler failures to a warning."""

    def run(self):
        try:
            super().run()
        except BUILD_ERRORS as e:
            self._skip(e)

    def build_extensions(self):
        try:
            super().build_extensions()
        except BUILD_ERRORS as e:
            self._skip(e)

    def _skip(self, error):
        warn(f"could not build cachefs._native ({error})")
        # Forget the extension, or editable installs try to copy the missing .so.
        self.extensions = []


def native_extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:
        warn("Cython is not installed")
        return []
    ext = Extension(
        "cachefs._native",
        ["native/_native.pyx"],
        extra_compile_args=["-O3"],
    )
    directives = {"language_level": 3, "boundscheck": False, "wraparound": False}
    return cythonize([ext], compiler_directives=directives)


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
