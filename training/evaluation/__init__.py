"""Evaluation: retrieval and grading metrics over numpy arrays (`metrics`) and the run report (`report`).

Nothing here imports torch: the training code turns its outputs into numpy arrays first, so these
functions are tested fast and reused for the CLIP-style baseline unchanged.
"""
