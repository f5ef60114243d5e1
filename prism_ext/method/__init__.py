"""prism_ext.method."""
