"""prism_ext.util."""
