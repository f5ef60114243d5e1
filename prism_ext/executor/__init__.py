"""prism_ext.executor."""
