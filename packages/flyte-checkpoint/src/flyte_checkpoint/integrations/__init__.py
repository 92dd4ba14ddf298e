"""Training-framework integrations, each in a module that imports its framework only when
that module is imported: ``flyte_checkpoint.integrations.lightning`` (PyTorch Lightning),
``flyte_checkpoint.integrations.transformers`` (Hugging Face ``Trainer``) and
``flyte_checkpoint.integrations.dcp`` (``torch.distributed.checkpoint``).

The callbacks mirror what the framework writes to the task's checkpoint in the background
(the training loop waits milliseconds, not the upload), and restore the newest checkpoint on
the next attempt for the framework's own resume argument; under several ranks they find the
setup themselves (rank 0 uploads replicated state; every rank contributes sharded state
through the collective save; one download per node on resume). The DCP helpers save and load
a sharded state dict as one object, on any world size.
"""
