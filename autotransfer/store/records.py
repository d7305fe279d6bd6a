"""Every attribute name that autotransfer's studies and trials carry, defined once.

Optuna keeps free-form attributes on a study and on each trial; autotransfer
stores its records there. Every module reads and writes them by these names
(``study.user_attrs.get(SPEC_ATTR)``, never ``.get("spec")``); a test in the
suite (tests/test_records.py) refuses a string literal in those calls. The
strings are part of the storage format: a study written by an older version is
read by these names, so never change a value, only add names.
"""

from __future__ import annotations

# --------------------------------------------------------------- study user attributes

SPEC_ATTR = "spec"
"""The resolved spec (``StudySpec.model_dump(mode="json")``), saved when the study is made."""
ARTIFACTS_ATTR = "artifacts"
"""The artifacts directory (checkpoints, epoch states) as the search saw it."""
TEST_METRICS_ATTR = "test_metrics"
"""``{trial number (str): {"accuracy", "macro_f1", "n", "classes", "per_class",
"confusion"}}``: test-set metrics, computed once. ``per_class`` maps each class name to
its ``precision``, ``recall``, ``f1`` and ``support``; ``confusion[i][j]`` counts test
examples of ``classes[i]`` predicted as ``classes[j]``. Studies written before the
per-class figures existed hold only ``accuracy``, ``macro_f1`` and ``n``."""
CLASSES_ATTR = "classes"
"""Class names in label order, stored at search time (export's labels)."""
TARGET_ATTR = "target_trials"
"""The study's total trial budget (:mod:`autotransfer.store.budget`); null: none."""
VERSION_ATTR = "autotransfer_version"
"""The autotransfer version that created the study."""

# --------------------------------------------------------------- trial user attributes

WORKER_ATTR = "worker"
"""The process running the trial: host, pid, machine id, process start time."""
DEVICE_ATTR = "device"
"""Where the trial ran: device (``cpu``, ``cuda:0``), gpu (model), gpu_id (the physical
index its worker was pinned to), precision, channels_last (:mod:`autotransfer.engine.device`)."""
N_BLOCKS_ATTR = "n_blocks"
"""How many trunk blocks the backbone has."""
FROZEN_BLOCKS_ATTR = "frozen_blocks"
"""How many of them the trial froze (from its ``freeze`` fraction)."""
EPOCHS_RUN_ATTR = "epochs_run"
"""The last epoch the trial finished."""
BEST_EPOCH_ATTR = "best_epoch"
"""The epoch of the trial's best validation accuracy (its checkpoint)."""
VAL_ACCURACY_ATTR = "val_accuracy"
"""The best epoch's validation accuracy (also the trial's value once complete)."""
VAL_F1_ATTR = "val_f1"
"""The best epoch's validation macro F1."""
VAL_LOSS_ATTR = "val_loss"
"""The best epoch's mean validation cross-entropy: the tie-break between trials (and
epochs) of equal validation accuracy (:func:`autotransfer.store.summary.best_trial`)."""
SECONDS_ATTR = "seconds"
"""Wall time of the trial's training, in seconds."""
PRUNED_AT_EPOCH_ATTR = "pruned_at_epoch"
"""The epoch after which the pruner stopped the trial."""
EFFECTIVE_BATCH_SIZE_ATTR = "effective_batch_size"
"""The batch of each optimiser step (the sampled ``batch_size``)."""
MICRO_BATCH_SIZE_ATTR = "micro_batch_size"
"""The largest forward pass that fitted (out-of-memory splits the batch)."""
OOM_EVENTS_ATTR = "oom_events"
"""How many times the batch was split after running out of memory."""
CHECKPOINT_ATTR = "checkpoint"
"""Artifact id of the best epoch's weights (:mod:`autotransfer.store.checkpoints`)."""
PREPROCESSING_ATTR = "preprocessing"
"""The backbone's preprocessing (mean/std, or the tokenizer's fingerprint)."""
FEATURES_CACHED_ATTR = "features_cached"
"""Whether the trial's training features came from the feature cache (engine/feature_cache)."""
FEATURE_VIEWS_ATTR = "feature_views"
"""How many augmented training views were cached (set only when cached)."""
PREFIX_BLOCKS_ATTR = "prefix_blocks"
"""Blocks run as a frozen prefix, the split point (0: none), at the trial's freeze depth."""
PROBE_EPOCHS_ATTR = "probe_epochs"
"""LP-FT: the first epochs, which trained the head alone (``probe_fraction``; 0: none)."""
FAIL_REASON_ATTR = "fail_reason"
"""Why a FAIL trial failed, one word: ``interrupted``, ``timeout``, ``worker_lost``, ..."""
FAIL_MESSAGE_ATTR = "fail_message"
"""The failure in a sentence (at most 500 characters)."""
RESUME_STATE_ATTR = "resume_state"
"""Artifact id of the last epoch's resumable state (:mod:`autotransfer.store.resume`)."""
RESUME_EPOCH_ATTR = "resume_epoch"
"""The epoch that state holds."""
RESUMED_FROM_EPOCH_ATTR = "resumed_from_epoch"
"""A retry that continued from an epoch state: that epoch."""
RETRY_OF_ATTR = "retry_of"
"""A queued copy of an interrupted or lost trial: that trial's number."""
REQUEUED_ATTR = "requeued"
"""An interrupted trial already queued again (the heartbeat retry skips it)."""
INTERRUPTED_ATTR = "interrupted"
"""The signal that interrupted the trial (``SIGTERM``, ``SIGINT``)."""

CARRIED_ATTRS = (RESUME_STATE_ATTR, RESUME_EPOCH_ATTR)
"""User attributes a retried trial inherits from the trial it re-runs."""

# --------------------------------------------------------------- trial system attributes
# Optuna's own names (RetryHeartbeatStaleTrialCallback writes them); ours to read.

FAILED_TRIAL_ATTR = "failed_trial"
"""A retry: the number of the trial it retries (the first of its chain)."""
RETRY_HISTORY_ATTR = "retry_history"
"""A retry: the numbers of every trial of its chain so far."""

# --------------------------------------------------------------- values

LOST_REASON = "worker_lost"
"""``fail_reason`` of a trial whose worker died."""
