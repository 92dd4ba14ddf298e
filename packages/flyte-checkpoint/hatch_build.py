"""Pins the sibling packages exactly to this package's own version, at build time.

The three packages are released together with one version (RELEASING in the root README):
``__version__`` in each package is the only place it is written, and the pins below follow
this package's, so a release cannot ship a flyte-checkpoint that asks for other siblings.
"""

from __future__ import annotations

from hatchling.metadata.plugin.interface import MetadataHookInterface

# name[extras] of each sibling requirement; extra of ours -> the siblings it needs.
DEPENDENCIES = ["checkpoint-format[fast]", "checkpoint-io"]
OPTIONAL = {
    "s3": ["checkpoint-io[s3]"],
    "gcs": ["checkpoint-io[gcs]"],
    "azure": ["checkpoint-io[azure]"],
    "all": ["checkpoint-io[all]"],
}


class SiblingPins(MetadataHookInterface):
    PLUGIN_NAME = "custom"

    def update(self, metadata: dict) -> None:
        version = metadata["version"]
        metadata["dependencies"] = [f"{name}=={version}" for name in DEPENDENCIES]
        metadata["optional-dependencies"] = {
            extra: [f"{name}=={version}" for name in names] for extra, names in OPTIONAL.items()
        }
