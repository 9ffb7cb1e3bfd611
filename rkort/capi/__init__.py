"""Mirrors ``onnxruntime.capi`` so that imports written for onnxruntime resolve under rkort too."""
