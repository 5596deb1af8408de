"""The layer under the stages: device, torchrun, run folder, checkpoints, atomic writes.

Every stage, the pipeline, the benches and the tests use these; a stage never imports
another stage for a utility."""
from guard_fast.runtime.checkpoint import (classifier_arch, load_classifier, load_training_state,
                                           save_classifier, save_training_state, teacher_path)
from guard_fast.runtime.device import resolve_device
from guard_fast.runtime.dist import Dist, all_gather_object, barrier, dist_env, distributed
from guard_fast.runtime.io import (WriteError, append_jsonl, atomic_torch_save,
                                   atomic_write_bytes, atomic_write_json, load_checkpoint,
                                   remove_stale_temps)
from guard_fast.runtime.numeric import (DivergedError, DivergenceWatch, NonFiniteError,
                                        StepWatch, as_nonfinite, check_finite_tensor,
                                        check_finite_weights)
from guard_fast.runtime.runfolder import FolderInUseError, RunFolder, flatten, recorded_seconds
from guard_fast.runtime.seed import epoch_seed, seed_all

__all__ = ["resolve_device", "Dist", "distributed", "dist_env", "barrier", "all_gather_object",
           "RunFolder", "flatten", "recorded_seconds", "classifier_arch", "save_classifier",
           "load_classifier",
           "save_training_state", "load_training_state", "atomic_write_bytes",
           "atomic_write_json", "atomic_torch_save", "load_checkpoint", "append_jsonl",
           "seed_all", "epoch_seed", "WriteError", "remove_stale_temps", "NonFiniteError",
           "StepWatch", "as_nonfinite", "check_finite_tensor", "check_finite_weights",
           "FolderInUseError", "DivergedError", "DivergenceWatch", "teacher_path"]
