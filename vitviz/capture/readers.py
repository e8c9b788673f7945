"""Which family reads which block: the declared list of readers, and what it says about a model.

A new family is a module that declares its ``Reader`` plus one line in ``READERS``. Whole-model readers (their
``layers`` given) are asked first, in order; any other model's ``model.blocks`` are read block by block, each by
the first reader whose ``site`` takes it. A block no reader takes is refused with one line naming the model, the
block and the attention class.
"""

from __future__ import annotations

from torch import nn

from vitviz.capture import cait, differential, hf, parallel, sam, standard
from vitviz.capture.core import AttentionSite, Reader, model_name, transformer_blocks
from vitviz.errors import VitvizError

READERS: tuple[Reader, ...] = (
    hf.READER,
    cait.READER,
    parallel.THINGS,
    parallel.SCALING,
    differential.PARALLEL,
    standard.ATTENTION,
    standard.BEIT,
    differential.ATTENTION,
    sam.READER,
)

# Attention classes known not to be read yet, with why (the one-line refusal says it).
_NOT_READ_YET = {
    "vision_transformer.ParallelThingsBlock": "its parallel attention branches are of a kind vitviz does not read",
}


def _class_name(module: nn.Module) -> str:
    """The class with its timm module (several timm models name their attention class just Attention)."""
    cls = type(module)
    return f"{cls.__module__.removeprefix('timm.models.').removeprefix('timm.layers.')}.{cls.__qualname__}"


def _layers(model: nn.Module) -> tuple[list[nn.Module], tuple[Reader, ...]]:
    """The modules read as layers 0..L-1 and the readers that may read them."""
    for reader in READERS:
        if reader.layers is not None and (layers := reader.layers(model)) is not None:
            return list(layers), (reader,)
    return list(transformer_blocks(model)), tuple(reader for reader in READERS if reader.layers is None)


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every layer's attention site, in order; one line naming the model and the attention class otherwise."""
    layers, readers = _layers(model)
    sites = []
    for index, block in enumerate(layers):
        site = next((s for reader in readers if (s := reader.site(block, model)) is not None), None)
        if site is None:
            attn = getattr(block, "attn", None)
            if attn is None:
                kind = f"no attention module (a {_class_name(block)} block)"
            else:
                kind = f"attention class {_class_name(attn)}"
            owner = block if attn is None else attn
            why = _NOT_READ_YET.get(_class_name(owner), "vitviz does not read it exactly")
            raise VitvizError(f"cannot read the attention of {model_name(model)}: block {index} has {kind}; {why}")
        sites.append(site)
    return sites


def unreadable_reason(model: nn.Module) -> str | None:
    """None when capture can read every block of the model exactly; otherwise the one-line reason it refuses,
    so a caller can mark the attention analyses not applicable and run the others."""
    try:
        attention_sites(model)
    except VitvizError as error:
        return str(error)
    return None


def attention_depth(model: nn.Module) -> int:
    """Attention layers as the analyses count them: every block read (CaiT's class-attention blocks included), or,
    when the capture cannot read the model, its blocks. One walk over the model."""
    try:
        return len(attention_sites(model))
    except VitvizError:
        return len(getattr(model, "blocks", []))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every transformer block (the block itself for parallel blocks), in order;
    refuses models it cannot capture exactly with a one-line VitvizError."""
    return [site.owner for site in attention_sites(model)]


def class_attention_layers(model: nn.Module) -> tuple[int, ...]:
    """The layers in which only the class token queries (CaiT's class-attention blocks, whose patch rows are the
    identity); refuses models it cannot capture exactly with a one-line VitvizError."""
    return tuple(index for index, site in enumerate(attention_sites(model)) if site.class_queries_only)
