"""Working with other tools' files: Axolotl configs in (`axolotl`), and the adapters other tools load.

Nothing here imports torch: `lpeft convert` reads and writes YAML only.
"""

from lightning_peft.interop.axolotl import Conversion, convert_axolotl, convert_axolotl_file, write_run_config

__all__ = ["Conversion", "convert_axolotl", "convert_axolotl_file", "write_run_config"]
