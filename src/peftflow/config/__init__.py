"""The experiment config: typed, frozen, strict; its hash plus the data md5 is the run key.

Modules: :mod:`.sections` (data, model, train, generation, tracking), :mod:`.methods`
(each method's own settings), :mod:`.experiment` (the whole config, its hash and run
key), :mod:`.loading` (YAML files, ``--set`` overrides, errors that name the fix).
The names below are the package's public API.

Depends on: nothing in peftflow beyond errors.
"""

from peftflow.config.experiment import (
    RUN_KEY_EXCLUDED,
    RUN_KEY_OMITTED_AT_DEFAULT,
    TASK_DEFAULTS,
    TASK_METRICS,
    ExperimentConfig,
    Task,
    default_promote_metric,
    dotted,
)
from peftflow.config.loading import (
    apply_overrides,
    format_validation_error,
    load_config,
    parse_config,
    parse_overrides,
    read_yaml_mapping,
)
from peftflow.config.methods import (
    METHOD_SETTINGS,
    FullSettings,
    MethodConfig,
    MethodSettings,
    merges_into_base,
)
from peftflow.config.sections import (
    DataConfig,
    Frozen,
    GenerationConfig,
    ModelConfig,
    SplitConfig,
    TrackingConfig,
    TrainConfig,
    refuse_credentials,
)

__all__ = [
    "METHOD_SETTINGS",
    "FullSettings",
    "merges_into_base",
    "RUN_KEY_EXCLUDED",
    "RUN_KEY_OMITTED_AT_DEFAULT",
    "TASK_DEFAULTS",
    "TASK_METRICS",
    "DataConfig",
    "ExperimentConfig",
    "Frozen",
    "GenerationConfig",
    "MethodConfig",
    "MethodSettings",
    "ModelConfig",
    "SplitConfig",
    "Task",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "default_promote_metric",
    "dotted",
    "format_validation_error",
    "load_config",
    "parse_config",
    "parse_overrides",
    "read_yaml_mapping",
    "refuse_credentials",
]
