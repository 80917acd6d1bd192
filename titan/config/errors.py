"""The error every configuration check raises."""


class ConfigError(ValueError):
    """A configuration problem, with the keys involved and a fix."""
