"""GPU kernels of the Twilight pipeline, one subpackage per backend: ``triton``, ``cuda`` (``csrc/``, built just in
time) and ``flashinfer``. Import them through ``twilight.backends.resolve_backend``; see ``README.md`` here."""
