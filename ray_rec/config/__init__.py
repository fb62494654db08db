"""Every setting, typed and checked in one place: prepare, model, data, train, eval and serve.

YAML files, CLI flags and Serve's application arguments only fill these in: the classes are in
`ray_rec.config.sections` (a bad value is reported once, naming the field and the value), the
reading of files and ``--set`` overrides in `ray_rec.config.loading` (which adds the file).
Importing this package does nothing.
"""

from ray_rec.config.loading import (
    PREPARE_SECTION,
    SECTIONS,
    build,
    config_from_dict,
    load_config,
    parse_overrides,
    prepare_settings,
    read_config_file,
)
from ray_rec.config.sections import (
    DEVICE_NAMES,
    ENGINES,
    FORMATS,
    LOSSES,
    PRECISIONS,
    SAVED_BEFORE,
    SPLITS,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PrepareOptions,
    TrainConfig,
    for_data,
    network_choices,
    with_catalog,
)
from ray_rec.config.serving import (
    MAX_REQUEST_LIST,
    REDIS_PASSWORD_ENV,
    REDIS_URL_ENV,
    STATE_BACKENDS,
    ServeConfig,
    StateConfig,
)

__all__ = [
    "DEVICE_NAMES", "ENGINES", "FORMATS", "LOSSES", "MAX_REQUEST_LIST", "PRECISIONS", "PREPARE_SECTION",
    "REDIS_PASSWORD_ENV", "REDIS_URL_ENV", "SAVED_BEFORE", "SECTIONS", "SPLITS", "STATE_BACKENDS", "Config", "DataConfig",
    "EvalConfig", "ModelConfig", "PrepareOptions", "ServeConfig", "StateConfig", "TrainConfig", "build",
    "config_from_dict", "for_data", "load_config", "network_choices", "parse_overrides", "prepare_settings",
    "read_config_file", "with_catalog",
]
