"""One configuration system: a dataclass per stage with its presets beside it, help text,
unit and range on every field, one resolution path (guard_fast.config.base.resolve) and the
command line generated from the fields (guard_fast.config.base.add_options)."""
from guard_fast.config.base import (add_options, flag_of, opt, overrides_from, parse_fraction,
                                    resolve, to_dict, validate)
from guard_fast.config.evaluate import (EVAL_PROTOCOL, EVAL_RULE, PROTOCOL_CHOICES,
                                        EvaluateConfig, default_eps)
from guard_fast.config.dc import (DC_DATASETS, DC_GUARD_MODES, DC_H_SPACES, DC_INITS, DC_LOOPS,
                                  DC_REGULARIZERS, DCConfig, get_loops, resolve_dc)
from guard_fast.config.experts import EXPERTS_PRESETS, ExpertsConfig, resolve_experts
from guard_fast.config.mtt import MTT_PRESETS, TESLA_PRESETS, MTTConfig, resolve_mtt
from guard_fast.config.methods import METHODS, method_spec
from guard_fast.config.pipeline import PIPELINE_PRESETS, PipelineConfig, resolve_settings
from guard_fast.config.recover import (CDA_MODES, RECOVER_METHODS, RECOVER_PRESETS,
                                       RecoverConfig, resolve_recover)
from guard_fast.config.relabel import (DTYPES, PRESET_FIELDS, RelabelConfig, check_relabel,
                                       resolve_relabel)
from guard_fast.config.squeeze import (GUARD_MODES, PRESETS_NEEDING_DATA, REGULARIZERS,
                                       SQUEEZE_PRESETS, SqueezeConfig, field_help,
                                       resolve_squeeze)
from guard_fast.config.student import (LOSS_SCALES, MIXES, OPTIMIZERS, STUDENT_PRESETS,
                                       StudentConfig, check_choices, resolve_student,
                                       validate_student)

__all__ = ["opt", "resolve", "validate", "add_options", "overrides_from", "flag_of", "to_dict",
           "parse_fraction",
           "PipelineConfig", "PIPELINE_PRESETS", "resolve_settings", "METHODS", "method_spec",
           "EvaluateConfig", "EVAL_PROTOCOL", "EVAL_RULE", "PROTOCOL_CHOICES", "default_eps",
           "SqueezeConfig", "SQUEEZE_PRESETS", "PRESETS_NEEDING_DATA", "REGULARIZERS",
           "GUARD_MODES", "resolve_squeeze", "field_help",
           "RecoverConfig", "RECOVER_PRESETS", "RECOVER_METHODS", "CDA_MODES", "resolve_recover",
           "DCConfig", "DC_REGULARIZERS", "DC_INITS", "DC_GUARD_MODES", "DC_H_SPACES",
           "DC_DATASETS", "DC_LOOPS", "get_loops", "resolve_dc",
           "StudentConfig", "STUDENT_PRESETS", "OPTIMIZERS", "LOSS_SCALES", "MIXES",
           "resolve_student", "validate_student", "check_choices",
           "RelabelConfig", "DTYPES", "PRESET_FIELDS", "resolve_relabel", "check_relabel",
           "ExpertsConfig", "EXPERTS_PRESETS", "resolve_experts",
           "MTTConfig", "MTT_PRESETS", "TESLA_PRESETS", "resolve_mtt"]
