"""Every place raystudy reaches below Ray's public API, for the one Ray version they were tested with.

Each has no public equivalent in Ray 2.60 and is argued where it is defined:
- credential propagation: Ray Tune copies the driver's AWS credentials into every trainable's
  runtime_env (`ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE`);
- the function trainable's restore: a trial restores from its newest kept checkpoint when the one
  a killed driver's snapshot names is gone (`ray.tune.trainable.wrap_function`, Ray's training
  result type);
- the W&B logging actor: Ray hands it WANDB_API_KEY in a runtime_env (`_start_logging_actor`).
A Ray release may change any of them without notice, so importing this module with another Ray
installed is one line naming the tested version (tests/test_ray_internals.py).
"""

from __future__ import annotations

import os

import ray

from raystudy.errors import RaystudyError

TESTED_RAY = "2.60.0"


def check_ray_version(installed: str) -> None:
    if installed != TESTED_RAY:
        raise RaystudyError(
            f"raystudy reaches into Ray {TESTED_RAY}'s internals (raystudy/cluster/ray_internals.py) and Ray "
            f"{installed} is installed: install ray[tune]=={TESTED_RAY} (pip install -e . does)"
        )


check_ray_version(ray.__version__)


def keep_credentials_out_of_trial_runtime_envs(is_credential) -> None:
    """Ray Tune copies the driver's AWS credentials into every trainable's runtime_env (the names in
    ENV_VARS_TO_PROPAGATE), which the job table keeps and runtime_env_agent.log prints. No public
    setting turns that off, so the credential names are dropped from that set; workers take
    credentials from their own environment instead."""
    from ray.tune.execution import class_cache

    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", set())
    propagated.difference_update({name for name in propagated if is_credential(name)})


def function_trainable(function, state_file: str) -> type:
    """Ray's class for a function trainable (`wrap_function`), restoring as
    `restoring_newest_checkpoint` says."""
    from ray.tune.trainable import wrap_function

    return restoring_newest_checkpoint(wrap_function(function), state_file)


def restoring_newest_checkpoint(trainable: type, state_file: str) -> type:
    """The trainable class, restoring from the newest checkpoint its trial folder holds when the
    one Ray names is gone. Ray deletes a trial's old checkpoints (num_to_keep) as
    soon as newer ones are reported, but a killed driver's experiment snapshot can still name one
    of them: Ray's own restore then fails the trial on every retry ("does not exist on storage
    anymore"). `state_file`: the file a complete checkpoint holds (one cut short by a crash lacks it)."""
    import pyarrow.fs

    class NewestCheckpointTrainable(trainable):
        def restore(self, checkpoint_path):
            checkpoint = getattr(checkpoint_path, "checkpoint", None)
            if checkpoint is None or _exists(checkpoint.filesystem, checkpoint.path):
                return super().restore(checkpoint_path)
            newest = _newest_checkpoint(checkpoint.filesystem, os.path.dirname(checkpoint.path))
            if newest is None:
                print(f"checkpoint {checkpoint.path} is gone and no other was kept: training from the start")
                return None
            print(f"checkpoint {checkpoint.path} is gone: restoring from the newest kept, {newest}")
            replacement = type(checkpoint)(newest, filesystem=checkpoint.filesystem)
            return super().restore(type(checkpoint_path)(checkpoint=replacement, metrics=checkpoint_path.metrics))

    def _exists(filesystem, path: str) -> bool:
        return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def _newest_checkpoint(filesystem, trial_path: str) -> str | None:
        """The checkpoint folder whose state file was written last (by time, not by name: a driver
        restored from an old snapshot numbers its checkpoints again from there)."""
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(trial_path, allow_not_found=True))
        folders = [f.path for f in found if f.type == pyarrow.fs.FileType.Directory and "checkpoint_" in f.base_name]
        states = [filesystem.get_file_info(f"{folder}/{state_file}") for folder in folders]
        written = [
            (state.mtime, folder) for state, folder in zip(states, folders) if state.type == pyarrow.fs.FileType.File
        ]
        return max(written)[1] if written else None

    NewestCheckpointTrainable.__name__ = trainable.__name__
    return NewestCheckpointTrainable


def wandb_callback_class():
    """Ray's W&B logger callback, whose logging actor gets no WANDB_API_KEY in its runtime_env (which
    the job table keeps and runtime_env_agent.log prints): the actor runs on this node (Ray places
    it here) and inherits the key from the environment Ray was started with instead."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    class WandbLoggerCallbackWithoutKey(WandbLoggerCallback):
        def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
            key = os.environ.pop("WANDB_API_KEY", None)
            try:
                super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)
            finally:
                if key is not None:
                    os.environ["WANDB_API_KEY"] = key

    return WandbLoggerCallbackWithoutKey
