"""The torch-free benchmarks, in one place: embedding engines (`embed`), vector search (`search`), their
report (`run`, `retina-index bench`), the service load generator (`load`, `retina-serve bench`) and the bare
model it is compared with (`bare`). The PyTorch halves live in `training.bench`, since index cannot import torch."""
