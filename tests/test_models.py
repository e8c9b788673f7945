"""The model factory, config validation, position-embedding variants and input-size resampling."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed

from vitviz.errors import VitvizError
from vitviz.models import (
    ModelMeta,
    ViTConfig,
    build_model,
    count_parameters,
    load_checkpoint,
    patch_position_embeddings,
    resample_input_size,
    save_checkpoint,
)
from vitviz.tokens import token_layout

POS_EMBEDS = ["learned", "learned_2d", "sincos", "none", "relative"]
STEMS = ["patch", "hybrid"]
IMG = (32, 48)  # non-square on purpose: 4 x 6 tokens at stride 8


def tiny(**overrides: object) -> ViTConfig:
    base = dict(img_size=IMG, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, hybrid_layers=(1, 1))
    base.update(overrides)
    return ViTConfig(**base)  # type: ignore[arg-type]


def meta_for(cfg: ViTConfig) -> ModelMeta:
    return ModelMeta(
        arch="vitviz",
        config=cfg,
        class_names=[f"c{i}" for i in range(cfg.num_classes)],
        input_size=cfg.img_size,
        in_chans=cfg.in_chans,
        mean=(0.5,) * cfg.in_chans,
        std=(0.25,) * cfg.in_chans,
        training={},
        resolution_history=[],
    )


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
def test_every_variant_builds_and_runs_at_a_non_square_size(pos_embed: str, stem: str) -> None:
    reg_tokens = 0 if pos_embed == "relative" else 2
    cfg = tiny(pos_embed=pos_embed, stem=stem, reg_tokens=reg_tokens, in_chans=1 if stem == "hybrid" else 3)
    model = build_model(cfg).eval()
    seen: list[torch.Size] = []
    model.blocks[0].register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape))
    with torch.no_grad():
        logits = model(torch.randn(2, cfg.in_chans, *IMG))
    assert logits.shape == (2, 5)
    layout = token_layout(model)
    num_prefix = 1 + reg_tokens
    assert layout.img_size == IMG
    assert layout.grid == (4, 6)
    assert layout.stride == (8, 8)
    assert layout.num_prefix_tokens == num_prefix
    assert layout.num_reg_tokens == reg_tokens
    # The sequence that actually enters the blocks is what token_layout says it is.
    assert seen == [torch.Size([2, num_prefix + 24, 32])]
    table = patch_position_embeddings(model)
    if pos_embed in ("none", "relative"):
        assert table is None
    else:
        assert table is not None and table.shape == (24, 32)


def _hand_count(cfg: ViTConfig) -> int:
    """Parameters of a patch-stem ViT, written out from the architecture (trainable only)."""
    d, c, p = cfg.embed_dim, cfg.in_chans, cfg.patch_size
    gh, gw = cfg.img_size[0] // p, cfg.img_size[1] // p
    hidden = int(d * cfg.mlp_ratio)
    qkv = 3 * d * d + (3 * d if cfg.qkv_bias else 0)
    block = 2 * d + qkv + (d * d + d) + 2 * d + (d * hidden + hidden) + (hidden * d + d)
    if cfg.pos_embed == "relative":
        block += ((2 * gh - 1) * (2 * gw - 1) + 3 * int(cfg.class_token)) * cfg.num_heads
    prefix = int(cfg.class_token) + cfg.reg_tokens
    pos = {
        "learned": (prefix + gh * gw) * d,
        "learned_2d": (gh + gw) * (d // 2),
        "sincos": 0,
        "none": 0,
        "relative": 0,
    }[cfg.pos_embed]
    head = (d * d + d if cfg.head == "pretrain" else 0) + d * cfg.num_classes + cfg.num_classes
    return (d * c * p * p + d) + prefix * d + pos + cfg.depth * block + 2 * d + head


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(),
        tiny(
            pos_embed="learned_2d", class_token=False, global_pool="avg", head="pretrain", qkv_bias=False, mlp_ratio=2.0
        ),
        tiny(pos_embed="relative", depth=3, num_heads=4),
        tiny(pos_embed="sincos", reg_tokens=3, in_chans=1),
    ],
    ids=["learned", "learned_2d-avg-pretrain", "relative", "sincos-reg-grey"],
)
def test_parameter_counts_match_a_hand_computation(cfg: ViTConfig) -> None:
    model = build_model(cfg)
    assert count_parameters(model, trainable_only=True) == _hand_count(cfg)


def test_paper_base_config_has_86m_parameters() -> None:
    # ViT-B/16 at 224 px with a 1000-class head: 86.6M parameters, as timm and the paper report.
    cfg = ViTConfig(embed_dim=768, depth=12, num_heads=12)
    assert cfg.approx_num_params() == pytest.approx(86.6e6, rel=0.01)
    assert _hand_count(cfg) == 86_567_656


def test_learned_2d_table_is_x_and_y_tables_concatenated_per_position() -> None:
    model = build_model(tiny(pos_embed="learned_2d")).eval()
    table = patch_position_embeddings(model)
    x_table, y_table = model.pos_embed_x[0], model.pos_embed_y[0]  # [gw, D/2], [gh, D/2]
    assert x_table.shape == (6, 16) and y_table.shape == (4, 16)
    for r in range(4):
        for c in range(6):
            assert torch.equal(table[r * 6 + c], torch.cat([x_table[c], y_table[r]]))
    # ... and it is what the forward pass adds to the patch tokens (prefix tokens get nothing).
    images = torch.randn(1, 3, *IMG)
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(images))
        assert torch.allclose(tokens[0, 1:], model.patch_embed(images)[0] + table)
        assert torch.equal(tokens[0, 0], model.cls_token[0, 0])


def _sincos_reference(gh: int, gw: int, dim: int) -> torch.Tensor:
    """MoCo v3 / timm layout, written out: [sin(y w_k), sin(x w_k), cos(y w_k), cos(x w_k)], w_k = 1e4^(-k/(D/4))."""
    quarter = dim // 4
    out = torch.zeros(gh * gw, dim, dtype=torch.float64)
    for r in range(gh):
        for c in range(gw):
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                out[r * gw + c, k] = math.sin(r * omega)
                out[r * gw + c, quarter + k] = math.sin(c * omega)
                out[r * gw + c, 2 * quarter + k] = math.cos(r * omega)
                out[r * gw + c, 3 * quarter + k] = math.cos(c * omega)
    return out


def test_sincos_is_timms_fixed_table() -> None:
    model = build_model(tiny(pos_embed="sincos"))
    table = patch_position_embeddings(model)
    assert torch.equal(table, build_sincos2d_pos_embed([4, 6], dim=32))
    assert torch.allclose(table.double(), _sincos_reference(4, 6, 32), atol=1e-6)
    assert not model.pos_embed.requires_grad
    assert "pos_embed" not in {n for n, p in model.named_parameters() if p.requires_grad}


def test_patch_position_embeddings_on_stock_timm_models() -> None:
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(64, 96))
    assert torch.equal(patch_position_embeddings(plain), plain.pos_embed[0, 1:].detach())
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64)
    assert torch.equal(patch_position_embeddings(distilled), distilled.pos_embed[0, 2:].detach())
    registers = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56)
    assert registers.no_embed_class and registers.num_prefix_tokens == 5
    assert torch.equal(patch_position_embeddings(registers), registers.pos_embed[0].detach())
    relpos = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, img_size=64)
    assert patch_position_embeddings(relpos) is None


def test_config_round_trips_through_json() -> None:
    cfg = tiny(pos_embed="learned_2d", stem="hybrid", hybrid_layers=(2, 1), reg_tokens=1, head="pretrain")
    restored = ViTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert restored.img_size == IMG and restored.hybrid_layers == (2, 1)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"depth": 10**6}, "depth"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"embed_dim": 8192, "depth": 256, "num_heads": 8}, "parameters"),
        ({"img_size": [10**6, 32]}, "img_size"),
        ({"mlp_ratio": float("nan")}, "mlp_ratio"),
        ({"depth": "12"}, "depth"),
        ({"depth": True}, "depth"),
        ({"qkv_bias": 1}, "qkv_bias"),
        ({"img_size": [32]}, "img_size"),
        ({"pos_embed": "rope"}, "pos_embed"),
        ({"colour": "blue"}, "colour"),
        ({"in_chans": 4}, "in_chans"),
        ({"img_size": [30, 48]}, "divisible"),
        ({"num_heads": 3}, "num_heads"),
        ({"class_token": False}, "class_token"),
        ({"pos_embed": "relative", "reg_tokens": 1}, "register"),
        ({"stem": "hybrid", "hybrid_layers": [1, 1, 1]}, "stride"),
        ({"pos_embed": "sincos", "embed_dim": 34, "num_heads": 2}, "divisible by 4"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
    ],
)
def test_from_dict_rejects_bad_configs(change: dict, needle: str) -> None:
    data = tiny().to_dict()
    data.update(change)
    with pytest.raises(VitvizError, match=needle):
        ViTConfig.from_dict(data)


def test_resample_learned_matches_timm_and_runs_at_the_new_size() -> None:
    model_cfg = tiny()
    model = build_model(model_cfg).eval()
    meta = meta_for(model_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new_model, new_meta = resample_input_size(model, meta, (64, 40))
    expected = resample_abs_pos_embed(before["pos_embed"], new_size=[8, 5], old_size=[4, 6], num_prefix_tokens=1)
    assert torch.equal(new_model.pos_embed.detach(), expected)
    assert torch.equal(new_model.pos_embed[0, 0], before["pos_embed"][0, 0])  # class entry kept as it was
    with torch.no_grad():
        assert new_model(torch.randn(2, 3, 64, 40)).shape == (2, 5)
    assert token_layout(new_model).grid == (8, 5)
    assert new_meta.input_size == (64, 40) and new_meta.config.img_size == (64, 40)
    assert new_meta.config == ViTConfig.from_dict({**model_cfg.to_dict(), "img_size": [64, 40]})
    assert new_meta.resolution_history == [{"method": "bicubic", "old_grid": [4, 6], "new_grid": [8, 5]}]
    # The original model and meta are untouched.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert meta.resolution_history == [] and token_layout(model).grid == (4, 6)


def test_resample_learned_2d_equals_resampling_the_materialised_table() -> None:
    model = build_model(tiny(pos_embed="learned_2d"))
    full_before = patch_position_embeddings(model)[None]  # (1, 24, D)
    new_model, new_meta = resample_input_size(model, meta_for(tiny(pos_embed="learned_2d")), (56, 72))
    expected = resample_abs_pos_embed(full_before, new_size=[7, 9], old_size=[4, 6], num_prefix_tokens=0)
    # Bicubic resampling is separable, so per-axis resampling of the factorised tables gives the same table.
    assert torch.allclose(patch_position_embeddings(new_model), expected[0], atol=1e-5)
    assert new_model.pos_embed_x.shape == (1, 9, 16) and new_model.pos_embed_y.shape == (1, 7, 16)
    assert new_meta.resolution_history[-1]["method"] == "bicubic"


def test_resample_sincos_recomputes_and_relative_resizes(tmp_path) -> None:
    sincos = build_model(tiny(pos_embed="sincos"))
    new_sincos, _ = resample_input_size(sincos, meta_for(tiny(pos_embed="sincos")), (64, 64))
    assert torch.equal(patch_position_embeddings(new_sincos), build_sincos2d_pos_embed([8, 8], dim=32))
    assert not new_sincos.pos_embed.requires_grad

    cfg = tiny(pos_embed="relative", stem="hybrid")
    relative = build_model(cfg).eval()
    new_rel, new_meta = resample_input_size(relative, meta_for(cfg), (64, 64))
    table = new_rel.blocks[0].attn.rel_pos.relative_position_bias_table
    assert table.shape == ((2 * 8 - 1) * (2 * 8 - 1) + 3, 2)
    with torch.no_grad():
        assert new_rel(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    # The resampled model saves and loads back exactly: its new config rebuilds the same architecture.
    save_checkpoint(tmp_path / "rel.safetensors", new_rel, new_meta)
    loaded = load_checkpoint(tmp_path / "rel.safetensors")
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), new_rel(images))
    assert loaded.meta.resolution_history == [
        {"method": "relative-bias-resize", "old_grid": [4, 6], "new_grid": [8, 8]}
    ]
