"""rknn-toolkit2 in child processes: the only place rkort runs the converter or its simulator.

``protocol`` is what parent and child say to each other, ``process`` the parent's handle on a
child (``WorkerProcess``), ``console`` what becomes of the child's console output, and ``child``
the child itself (``python -m rkort.toolkit.child``).
"""
