"""Fits on a frozen model from one pass over the positions at risk: the PRS logit bias and the incidence refit."""
