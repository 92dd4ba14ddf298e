"""``flyte.io`` where the upstream Flyte SDK is not installed: checkpoint-io's ``File``,
configured as our ``Checkpoint`` configures its own transfers: the ``CHECKPOINT_IO_*``
settings and the store settings upstream reads (``flyte_checkpoint._storage``), taken when
the File is made. :meth:`~checkpoint_io.File.with_options` overrides them."""

import checkpoint_io
from flyte_checkpoint._settings import Settings
from flyte_checkpoint._storage import flyte_storage_options

__all__ = ["File"]


class File(checkpoint_io.File):
    __doc__ = checkpoint_io.File.__doc__

    def model_post_init(self, context: object) -> None:
        super().model_post_init(context)
        configured = self.with_options(storage_options=flyte_storage_options(self.path) or None,
                                       **Settings.from_env().file_options())
        self._options = configured._options
