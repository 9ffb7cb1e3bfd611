"""``from rknnlite.api import RKNNLite``, as on a board: the rehearsal's stand-in
(:class:`rkort.rehearsal.standin.RKNNLite`)."""

from rkort.rehearsal.standin import RKNNLite

__all__ = ["RKNNLite"]
