"""For `make test-stress`'s ort-threads modes (tests/stress.py), on PYTHONPATH so that every Python
process of the run imports it at start: each ONNX Runtime session that leaves its intra-op threads
to ONNX Runtime (0, the default) gets ``$STRESS_ORT_THREADS`` instead; a session that sets its own
keeps them. ONNX Runtime reads no variable for this, and the suite's sessions are made in tests,
fixtures, scorers and servers alike, so the count is set where every one of them is opened.

onnxruntime is patched when it is first imported, not here: most processes never import it, and
the decoders' memory limit has no room for it."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

THREADS = int(os.environ.get("STRESS_ORT_THREADS", "0"))


def patch(ort) -> None:
    opened = ort.InferenceSession.__init__

    def __init__(self, path_or_bytes, sess_options=None, providers=None, provider_options=None, **kwargs):
        sess_options = sess_options or ort.SessionOptions()
        if sess_options.intra_op_num_threads == 0:
            sess_options.intra_op_num_threads = THREADS
        opened(self, path_or_bytes, sess_options, providers, provider_options, **kwargs)

    ort.InferenceSession.__init__ = __init__


class PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "onnxruntime":
            return None
        sys.meta_path.remove(self)  # find the real module, once
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


if THREADS > 0:
    sys.meta_path.insert(0, PatchOnImport())
