"""Build hook: a regular wheel carries recipes/ and data/ inside the package; an editable install reads
them from the checkout instead (dlnotes.catalog.recipes_dir, dlnotes.datasets.data_root), so nothing is copied."""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class ShipRecipesAndData(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"]["recipes"] = "dlnotes/recipes"
            build_data["force_include"]["data"] = "dlnotes/_data"
