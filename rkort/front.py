"""What a session reads of an engine that runs copies of its model (a masked decoder, branch
programs) through engines of their own: the options, the shared cache, the model's hash and its
input and output names, set up once here for each such engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .cache import Cache, session_cache
from .model import ModelSource
from .options import RKNNOptions


class EngineFront:
    """The attributes a session reads of any engine (:class:`~rkort.engine.RKNNEngine` has
    them of its own)."""

    def __init__(
        self,
        model: ModelSource,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        options: RKNNOptions,
        cache: Cache | None,
    ) -> None:
        self.options = options
        self.cache = cache if cache is not None else session_cache(options)
        self.model_hash = model.content_hash(self.cache)
        self.input_names = tuple(i.name for i in inputs)
        self.output_names = tuple(o.name for o in outputs)
