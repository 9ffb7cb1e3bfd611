"""rknn-toolkit-lite2's package name, standing in for it in a board rehearsal (``rkort run
--board``): ``rknnlite.api.RKNNLite`` executes blobs on the host simulator."""
