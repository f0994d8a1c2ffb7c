"""The reference's ``layer_idxs`` grammar: which UNet layers to hook, and what they are called.

::

    layer_idxs:
      up_blocks:                  # an attribute of the UNet (a ModuleList of blocks, or one block)
        attn1: all                # every submodule whose name ends in "attn1", in every block
        conv2: [[1, 0], [3, 2]]   # or (block i, match j) pairs; [] selects none

A selected module is named ``{block}_{i}_{suffix}_{j}``: ``up_blocks_1_attn1_0`` is the first
``attn1`` of ``up_blocks[1]``. The order is the reference's: block name, block index, suffix (in the
order written), match index.

A selection is resolved against a *catalogue*: for each block name and suffix, how many modules end
in that suffix in each block (``{"up_blocks": {"attn1": [0, 3, 3, 3]}}``). The extractor builds it
from the UNet and the cache stores it, so that a fit resolves ``all`` against what the UNet has, not
against whatever subset a cache happens to hold. Every selector that names modules must match
them: ``all`` of a suffix no module has, or a pair the UNet lacks, is an error, never an empty or
partial selection; ``[]`` is the one way to select none of a suffix, and a selection as a whole
must select something.

This module has no torch import: configs and caches use it without loading a model.
"""

from __future__ import annotations

import re

from ..errors import UserError

LAYER_NAME = re.compile(r"^(?P<block>.+?)_(?P<i>\d+)_(?P<suffix>.+)_(?P<j>\d+)$")
GRAMMAR = "a mapping like {up_blocks: {attn1: all, conv2: [[1, 0], [2, 1]]}}"

Catalog = dict  # block -> suffix -> [number of matching modules in block 0, 1, ...]
# SatDiFuser's 21 decoder layers: every attn1 and conv2 of the UNet's up_blocks.
DEFAULT_LAYER_IDXS = {"up_blocks": {"attn1": "all", "conv2": "all"}}


class LayerSpecError(UserError):
    """A ``layer_idxs`` that selects something the UNet or the cache does not have."""


def parse(value) -> dict:
    """``value`` as block -> suffix -> ``"all"`` or a tuple of (i, j) pairs: the one reading of the
    grammar; a LayerSpecError saying what is allowed when ``value`` does not follow it."""
    wrong = LayerSpecError(f"layer_idxs is {value!r}; expected {GRAMMAR}")
    if not isinstance(value, dict) or not value:
        raise wrong
    spec = {}
    for block, by_suffix in value.items():
        if not isinstance(by_suffix, dict) or not by_suffix:
            raise wrong
        spec[block] = {}
        for suffix, sel in by_suffix.items():
            if sel != "all" and (not isinstance(sel, (list, tuple)) or not all(map(_is_pair, sel))):
                raise wrong
            spec[block][suffix] = sel if sel == "all" else tuple((i, j) for i, j in sel)
    return spec


def _is_pair(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) == 2 and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in p)


def check(value) -> str | None:
    """None when ``value`` follows the grammar, else the text of what is allowed (for config checks)."""
    try:
        parse(value)
    except LayerSpecError:
        return GRAMMAR
    return None


def layer_name(block: str, i: int, suffix: str, j: int) -> str:
    return f"{block}_{i}_{suffix}_{j}"


def _where(block: str, suffix: str, counts: list[int]) -> str:
    held = [f"{i} ({n})" for i, n in enumerate(counts) if n]
    return f"{suffix} modules are in {block} " + ", ".join(held) if held else f"no module of {block} ends in {suffix!r}"


def resolve(layer_idxs: dict, catalog: Catalog, what: str = "the UNet", hint=lambda block: "") -> list[str]:
    """Layer names selected by ``layer_idxs``, in the reference's order; every selector must match.

    ``what`` names the thing the catalogue describes in errors; ``hint(block)`` is added to an
    error about a selector of that block (what the UNet has, or how to re-extract).
    """
    plan = []  # (block, suffix, selection, counts)
    spec = parse(layer_idxs)
    for block, by_suffix in spec.items():
        if block not in catalog:
            raise LayerSpecError(f"layer_idxs names block {block!r}, which {what} does not have "
                                 f"(it has {', '.join(sorted(catalog)) or 'none'}){hint(block)}")
        for suffix, sel in by_suffix.items():
            if suffix not in catalog[block]:
                raise LayerSpecError(f"layer_idxs {block}.{suffix}: {what} has no {suffix} layers of {block}{hint(block)}")
            counts = list(catalog[block][suffix])
            if sel == "all" and not sum(counts):
                raise LayerSpecError(f"layer_idxs {block}.{suffix}: all matches nothing: "
                                     f"{_where(block, suffix, counts)}{hint(block)}")
            if sel != "all":
                for i, j in sel:
                    if i >= len(counts) or j >= counts[i]:
                        has = f"{block}[{i}] has {counts[i]}" if i < len(counts) else f"{block} has {len(counts)} blocks"
                        raise LayerSpecError(f"layer_idxs {block}.{suffix} pair [{i}, {j}] matches nothing in {what} "
                                             f"({has}); {_where(block, suffix, counts)}")
            plan.append((block, suffix, sel, counts))
    names = []
    for block in spec:
        entries = [p for p in plan if p[0] == block]
        for i in range(max(len(p[3]) for p in entries)):
            for _, suffix, sel, counts in entries:
                for j in range(counts[i] if i < len(counts) else 0):
                    if sel == "all" or (i, j) in sel:
                        names.append(layer_name(block, i, suffix, j))
    if not names:
        raise LayerSpecError(f"layer_idxs {layer_idxs} selects no layer of {what}")
    return names


def catalog_from_names(layer_idxs: dict, held: list[str]) -> tuple[Catalog, set]:
    """A catalogue rebuilt from a cache's own selection and layer names, for caches that predate the
    stored catalogue; also the (block, suffix) pairs it knows only in part (selected by pairs, so
    the UNet may have more modules than the cache holds)."""
    catalog: Catalog = {}
    partial = set()
    for block, by_suffix in parse(layer_idxs).items():
        for suffix, sel in by_suffix.items():
            counts: list[int] = []
            for name in held:
                m = LAYER_NAME.match(name)
                if m and m["block"] == block and m["suffix"] == suffix:
                    i, j = int(m["i"]), int(m["j"])
                    counts += [0] * (i + 1 - len(counts))
                    counts[i] = max(counts[i], j + 1)
            catalog.setdefault(block, {})[suffix] = counts
            if sel != "all":
                partial.add((block, suffix))
    return catalog, partial


def resolve_in_cache(layer_idxs: dict, held: list[str], catalog: Catalog | None, extracted_with: dict,
                     path: str) -> list[str]:
    """The cached layers ``layer_idxs`` selects: exactly what it would select on the UNet.

    ``catalog`` is the one stored at extraction (None for caches that predate it: it is rebuilt
    from ``extracted_with``, the cache's own ``layer_idxs``, and ``held``). A layer the selection
    names but the cache lacks is an error, so a fit never trains on fewer layers than asked.
    """
    extract = f"; the cache was extracted with layer_idxs {extracted_with}: extract one with the layers you want"
    partial: set = set()
    if catalog is None:
        catalog, partial = catalog_from_names(extracted_with, held)
    catalog = {b: {s: list(c) for s, c in by_suffix.items()} for b, by_suffix in catalog.items()}
    asked = parse(layer_idxs)
    for block, suffix in partial:
        sel = asked.get(block, {}).get(suffix)
        if sel == "all":
            raise LayerSpecError(f"layer_idxs {block}.{suffix}: all cannot be checked against cache {path}, which "
                                 f"holds only some of them ({extracted_with[block][suffix]}); list the pairs you want")
        counts = catalog[block][suffix]
        for i, j in sel or []:  # pairs the cache may lack: the check below names them
            counts += [0] * (i + 1 - len(counts))
            counts[i] = max(counts[i], j + 1)
    names = resolve(layer_idxs, catalog, f"cache {path}", lambda block: extract)
    lacking = [n for n in names if n not in held]
    if lacking:
        raise LayerSpecError(f"cache {path} lacks layers {lacking} that layer_idxs {layer_idxs} selects; it holds "
                             f"{len(held)}: {held}{extract}")
    return names
