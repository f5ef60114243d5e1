"""prism_ext.training."""
