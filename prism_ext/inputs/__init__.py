"""prism_ext.inputs."""
