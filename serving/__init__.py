"""Serving: the ONNX Runtime engine, the BentoML service, and the offline batch scorer. Torch-free."""
