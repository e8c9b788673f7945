"""Model layer: config -> timm ViT, position-embedding variants, checkpoint meta and format, loading sources
(checkpoints, runs, timm: and Hugging Face hf: models)."""

from vitviz.models.checkpoint import (
    LoadedModel,
    describe_mismatch,
    file_sha256,
    load_checkpoint,
    load_state_dict_checked,
    model_from_meta,
    read_adapters,
    read_checkpoint_meta,
    read_state_dict,
    save_checkpoint,
)
from vitviz.models.config import ViTConfig
from vitviz.models.factory import build_model, build_timm_model, count_parameters, pretrain_head
from vitviz.models.hf import HF_PREFIX, HFVisionTransformer, load_hf, resample_hf_input_size
from vitviz.models.meta import FORMAT_VERSION, ModelMeta
from vitviz.models.posembed import patch_position_embeddings, resample_input_size, sincos_pos_embed
from vitviz.models.runtime import any_training, model_device
from vitviz.models.sources import load_model, run_checkpoint, timm_meta

__all__ = [
    "FORMAT_VERSION",
    "HF_PREFIX",
    "HFVisionTransformer",
    "LoadedModel",
    "ModelMeta",
    "ViTConfig",
    "any_training",
    "build_model",
    "build_timm_model",
    "count_parameters",
    "describe_mismatch",
    "file_sha256",
    "load_checkpoint",
    "load_hf",
    "load_model",
    "load_state_dict_checked",
    "model_device",
    "model_from_meta",
    "patch_position_embeddings",
    "pretrain_head",
    "read_adapters",
    "read_checkpoint_meta",
    "read_state_dict",
    "resample_hf_input_size",
    "resample_input_size",
    "run_checkpoint",
    "save_checkpoint",
    "sincos_pos_embed",
    "timm_meta",
]
