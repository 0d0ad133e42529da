"""Token-compression methods, one module each; registered by name in `tokbench.pruner`."""
