"""Deep metric learning: NormSoftmax loss, class-balanced sampling, the training loop."""
