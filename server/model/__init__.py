"""The model: what `--model` names, its shape and its weights, for every backend.

From server start to the weights the path runs one way (docs/architecture.md, "The model"):
`resolve.resolve_model(spec)` finds the folder (or the synthetic shape), `config.config_from_hf`
turns its config.json into a `ModelConfig`, `weights.load_hf_folder` / `synthetic_weights`
fill the one weight arena, and a `LoadedModel` carries the three to the backend.
"""
from server.model.config import (SUPPORTED_ARCHS, SYNTHETIC_SHAPES, ConfigError, ModelConfig, config_from_hf,
                                  hf_config_dict, with_max_seq)
from server.model.memory import ModelTooLarge, check_fits
from server.model.resolve import BUILTIN, LoadedModel, ModelError, load_config, prepare_smollm2, resolve_model
from server.model.weights import (LayerWeights, ModelWeights, WeightLoadError, hf_state_dict, load_hf_folder,
                                  parse_dtype, rope_tables, save_hf_folder, synthetic_weights)

__all__ = ["SUPPORTED_ARCHS", "SYNTHETIC_SHAPES", "ConfigError", "ModelConfig", "config_from_hf", "hf_config_dict",
           "with_max_seq", "ModelTooLarge", "check_fits", "BUILTIN", "LoadedModel", "ModelError", "load_config", "prepare_smollm2",
           "resolve_model", "LayerWeights", "ModelWeights", "WeightLoadError", "hf_state_dict", "load_hf_folder",
           "parse_dtype", "rope_tables", "save_hf_folder", "synthetic_weights"]
