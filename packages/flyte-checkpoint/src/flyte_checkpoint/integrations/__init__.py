"""Training-framework integrations, each in a module that imports its framework only when
that module is imported: ``flyte_checkpoint.integrations.lightning`` (PyTorch Lightning) and
``flyte_checkpoint.integrations.transformers`` (Hugging Face ``Trainer``).

Both mirror what the framework writes to the task's checkpoint in the background (the
training loop waits milliseconds, not the upload), and restore the newest checkpoint on the
next attempt for the framework's own resume argument.
"""
