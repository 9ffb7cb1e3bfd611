"""rkort in other people's code: optimum, sentence-transformers and unchanged onnxruntime apps.

- :mod:`.install`: ``rkort.install()``: onnxruntime's module, and optimum's modules whenever
  they are imported, use rkort's session and provider lists; optimum accepts ``provider="RKNN"``.
- :mod:`.defaults`: the ``RKORT_AUTO`` policy that moves sessions asking for the CPU (or for
  nothing) to RKNN first, and the ways to opt out.
- :mod:`.run`: ``rkort run -- python app.py``, which installs rkort into an unchanged program.
"""
