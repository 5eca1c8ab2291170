"""Exception types shared by the stages.

Every error a user can cause (bad config, bad file, bad value) is one of these, with a
message that names the file, key or value and what was expected.
"""


class HomodyneStepsError(Exception):
    """Base class for errors caused by input (config, files, parameter values)."""


class ParameterError(HomodyneStepsError, ValueError):
    """A parameter name, value, count or analysis mode is not valid."""


class ModelInputError(HomodyneStepsError, ValueError):
    """Arrays or constants passed to the physics kernel are not valid."""


class SimulationError(HomodyneStepsError, ValueError):
    """Simulator settings are not valid."""


class DataError(HomodyneStepsError, ValueError):
    """An input data file is missing, unreadable, or not in a layout we can read.

    The message names the file, the HDF5 path or array key, and what was expected.
    """


class ConfigError(HomodyneStepsError, ValueError):
    """A stage's settings are invalid (unknown key, wrong type, value out of range)."""


class QualityError(HomodyneStepsError):
    """Data failed a quality-control checkpoint (score below the pass threshold)."""
