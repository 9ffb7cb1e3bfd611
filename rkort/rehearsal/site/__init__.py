"""The directory ``rkort run --board`` puts on PYTHONPATH: its package ``rknnlite`` is the board
runtime's stand-in. Nothing here is imported as ``rkort.rehearsal.site``; the marker only makes
the directory ship with rkort."""
