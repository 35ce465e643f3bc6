"""Training: the model registry, Fashion-MNIST data, the train loop and checkpoints."""
