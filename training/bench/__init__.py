"""The PyTorch benchmarks: training-step throughput (`step`, `retina-train bench`) and the towers' PyTorch
half of the embedding benchmark (`towers`, `retina-train bench-embed`, read by `retina-index bench`)."""
