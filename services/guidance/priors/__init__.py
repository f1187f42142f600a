"""Diffusion priors behind one interface (`base.DiffusionPrior`)."""
