"""Kernels of the Twilight pipeline, one subpackage per backend: ``cpu`` (C++ for the CPU, ``csrc/cpu_decode.cpp``),
``triton``, ``cuda`` (``csrc/``, built just in time) and ``flashinfer``. Import them through
``twilight.backends.resolve_backend``; see ``README.md`` here."""
