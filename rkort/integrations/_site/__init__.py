"""The directory ``rkort run`` puts first on ``PYTHONPATH``: its ``sitecustomize`` installs rkort.

Nothing here is imported as ``rkort.integrations._site``; the package marker only makes the
directory ship with rkort.
"""
