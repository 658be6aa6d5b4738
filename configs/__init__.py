"""The YAML configs shipped with the package: ``meloformer fit --config small.yaml`` finds them by name."""
