"""Serving: the BentoML service (HTTP edge, batching, the Open Inference Protocol, /ui) over
model_store's inference engine. Torch-free."""
