"""The one error a config can raise."""


class ConfigError(ValueError):
    """A configuration the run refuses; the message names each bad field and why."""
