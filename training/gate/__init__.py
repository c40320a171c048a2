"""The gradability gate: a small network, trained beside the model, that says whether a photograph is a
fundus photograph good enough to grade (`index.gate` describes its outputs and the answer)."""
