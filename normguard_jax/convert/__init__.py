"""Strict diffusers/safetensors -> param-tree converters (DESIGN.md §2, §8 tier 2).

``load_transformer`` (SD3/SD3.5 MMDiT), ``load_flux_transformer`` (FLUX.1 / FLUX.2, by ``_class_name``) and
``load_vae`` (AutoencoderKL) read a local diffusers directory
without torch; every problem raises one ConversionError that names all offending keys.
"""

from normguard_jax.convert.safetensors_io import (ConversionError, Checkpoint, Entry, SafetensorsFile,
                                                  apply_key_map, open_checkpoint)
from normguard_jax.convert.flux import load_transformer as load_flux_transformer
from normguard_jax.convert.sd3 import load_transformer
from normguard_jax.convert.vae import load_vae

__all__ = ["ConversionError", "Checkpoint", "Entry", "SafetensorsFile", "apply_key_map", "open_checkpoint",
           "load_flux_transformer", "load_transformer", "load_vae"]
