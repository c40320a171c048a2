"""Synthetic BRSET-layout archive: label priors, fundus renderer, archive writer."""
