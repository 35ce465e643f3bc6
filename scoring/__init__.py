"""Offline scoring: every image of a folder, a list of paths or an object-store prefix -> one row
each, written in numbered part files that survive a kill and let a run be resumed.

    python -m scoring photos/ --output scores/                 # one machine (cnn-score)
    python -m scoring photos/ --output scores/ --engine ray    # a Ray cluster (the [scale] extra)

``sources`` lists and reads the inputs, ``results`` turns predictions into rows, ``parts`` owns the
output folder (parts, manifest, resume), ``local`` and ``ray_engine`` are the two engines. The
preprocessing (``model_store.image_bytes_to_input``) and engine (``model_store.engine.OnnxClassifier``)
are the HTTP service's. Importing this package is cheap: Ray is imported only by ``ray_engine``.
"""
