"""rkort's own version (a module of its own so every room can read it without importing the face)."""

__version__ = "0.1.0"
