"""The one exception type raised for every configuration problem."""
from contextlib import contextmanager
from typing import Iterator, Optional


class ConfigError(ValueError):
    """An invalid configuration, described so that the user can fix it without reading code.

    ``message`` says what is wrong (naming the key path, the value and what is allowed),
    ``source`` names where the configuration came from (a YAML file, ``<dict>``, ...) and
    ``key`` is the offending ``section.field`` path when there is one, so that callers can
    point at the file that set it.
    """

    def __init__(self, message: str, *, source: Optional[str] = None, key: Optional[str] = None):
        self.message = message
        self.source = source
        self.key = key
        super().__init__(f"{source}: {message}" if source else message)

    def with_source(self, source: str) -> "ConfigError":
        """This error located in ``source``, unless it already names a source."""
        if self.source is not None:
            return self
        return ConfigError(self.message, source=source, key=self.key)


@contextmanager
def located_in(source: str) -> Iterator[None]:
    """Attach ``source`` to any ConfigError raised inside the block (unless it names one)."""
    try:
        yield
    except ConfigError as error:
        raise error.with_source(source) from None
