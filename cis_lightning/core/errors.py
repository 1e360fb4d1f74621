"""The one error type that the CLI turns into a clean message instead of a traceback."""


class ConfigError(ValueError):
    """A bad configuration value. The message starts with the field's name and says what is allowed."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def require(condition: bool, field: str, problem: str) -> None:
    """Raise ConfigError(field, problem) unless `condition` holds."""
    if not condition:
        raise ConfigError(field, problem)


def check_sizes(**sizes: int) -> None:
    """ConfigError unless every named size is a positive integer; keyword names are the fields."""
    for field, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(field, f"must be a positive integer, got {value!r}")
