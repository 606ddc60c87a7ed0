"""Errors mmgen raises for bad input. Each message names the file, row or key at fault."""


class DataError(ValueError):
    """A dataset file, row, record or image that cannot be used as it is."""


class ConfigError(ValueError):
    """A configuration value or a checkpoint that does not fit the model being built."""
