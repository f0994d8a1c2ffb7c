import pytest

from pipeline.backbone.layer_spec import LayerSpecError, check, parse, resolve, resolve_in_cache

CATALOG = {"up_blocks": {"attn1": [0, 3, 3, 3], "conv2": [3, 3, 3, 3]}}


def test_the_grammar_check_names_what_is_allowed():
    assert check({"up_blocks": {"attn1": "all", "conv2": [[1, 0]], "attn2": []}}) is None
    for bad in ({}, {"up_blocks": {}}, {"up_blocks": {"attn1": "some"}}, {"up_blocks": {"attn1": [[1]]}},
                {"up_blocks": {"attn1": [[1, -1]]}}, {"up_blocks": {"attn1": [[True, 0]]}}, ["up_blocks"]):
        assert check(bad).startswith("a mapping like {up_blocks: {attn1: all"), bad


def test_the_parser_gives_pairs_as_tuples_and_refuses_what_the_check_refuses():
    assert parse({"up_blocks": {"attn1": "all", "conv2": [[1, 0], (2, 1)], "attn2": []}}) == \
        {"up_blocks": {"attn1": "all", "conv2": ((1, 0), (2, 1)), "attn2": ()}}
    with pytest.raises(LayerSpecError, match=r"^layer_idxs is \{'up_blocks': \{'attn1': \[\[1\]\]\}\}; expected a mapping like"):
        parse({"up_blocks": {"attn1": [[1]]}})
    # resolve reads the grammar through the parser: a malformed selection is the same one-line error
    with pytest.raises(LayerSpecError, match="^layer_idxs is .*; expected a mapping like"):
        resolve({"up_blocks": {"attn1": "some"}}, CATALOG)


def test_names_follow_the_reference_order():
    # block name, block index, suffix in the order written, match index
    spec = {"up_blocks": {"conv2": [[1, 0], [0, 2]], "attn1": [[1, 2], [1, 0]]}}
    assert resolve(spec, CATALOG) == ["up_blocks_0_conv2_2", "up_blocks_1_conv2_0", "up_blocks_1_attn1_0",
                                      "up_blocks_1_attn1_2"]


def test_a_fit_resolves_its_selection_against_the_stored_catalogue():
    cat = {"up_blocks": {"attn1": [0, 3, 3, 3], "conv2": [3, 3, 3, 3]}}
    attn1 = [f"up_blocks_{i}_attn1_{j}" for i in (1, 2, 3) for j in range(3)]
    held = attn1[:3]  # extracted with attn1: [[1, 0], [1, 1], [1, 2]]
    extracted = {"up_blocks": {"attn1": [[1, 0], [1, 1], [1, 2]], "conv2": []}}
    assert resolve_in_cache({"up_blocks": {"attn1": [[1, 1]]}}, held, cat, extracted, "c") == ["up_blocks_1_attn1_1"]
    # "all" means all nine, as on the UNet: the cache holding three is an error, not a narrower fit.
    with pytest.raises(LayerSpecError, match=r"cache c lacks layers \['up_blocks_2_attn1_0'"):
        resolve_in_cache({"up_blocks": {"attn1": "all"}}, held, cat, extracted, "c")
    with pytest.raises(LayerSpecError, match="cache c has no attn2 layers of up_blocks; the cache was extracted with"):
        resolve_in_cache({"up_blocks": {"attn2": "all"}}, held, cat, extracted, "c")


def test_caches_without_a_catalogue_resolve_from_their_own_selection():
    held = [f"up_blocks_{i}_attn1_{j}" for i in (1, 2, 3) for j in range(3)] + ["up_blocks_1_conv2_0"]
    extracted = {"up_blocks": {"attn1": "all", "conv2": [[1, 0]]}}
    assert resolve_in_cache({"up_blocks": {"attn1": "all"}}, held, None, extracted, "c") == held[:9]
    assert resolve_in_cache({"up_blocks": {"conv2": [[1, 0]]}}, held, None, extracted, "c") == held[9:]
    with pytest.raises(LayerSpecError, match="all cannot be checked against cache c, which holds only some of them"):
        resolve_in_cache({"up_blocks": {"conv2": "all"}}, held, None, extracted, "c")
    with pytest.raises(LayerSpecError, match=r"cache c lacks layers \['up_blocks_2_conv2_1'\]"):
        resolve_in_cache({"up_blocks": {"conv2": [[2, 1]]}}, held, None, extracted, "c")
