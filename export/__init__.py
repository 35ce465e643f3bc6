"""Export: a training checkpoint -> a verified ONNX graph carrying its model card."""
