import pytest

from superweight.coordinates import SuperWeight, check_in_range
from superweight.directory import compare, load_directory, lookup
from tiny_models import make_model


def test_parse_round_trip():
    sw = SuperWeight.parse("2:3968:7003")
    assert sw == SuperWeight(2, 3968, 7003)
    assert SuperWeight.parse(sw.to_spec()) == sw


@pytest.mark.parametrize("spec", ["2:3968", "a:b:c", "2:3968:7003:1", "", "2,3968,7003", "-1:2:3"])
def test_parse_rejects_malformed(spec):
    with pytest.raises(ValueError, match="LAYER:ROW:COL|invalid"):
        SuperWeight.parse(spec)


def test_out_of_range_coordinates_named():
    model = make_model("llama")
    with pytest.raises(ValueError, match="layer 9 does not exist; the model has 4 layers"):
        check_in_range([SuperWeight(9, 0, 0)], model)
    with pytest.raises(ValueError, match=r"1:64:0 is out of range: .*shape \[64, 128\]"):
        check_in_range([SuperWeight(1, 64, 0)], model)


def test_directory_matches_exact_id_ignoring_case():
    assert lookup("huggyllama/llama-7B").super_weights == (SuperWeight(2, 3968, 7003),)
    assert lookup("HUGGYLLAMA/LLAMA-7b") is not None
    assert lookup("meta-llama/Llama-2-7b-chat-hf") is None  # never a substring match
    assert lookup("llama-7B") is None


def test_directory_contains_paper_index():
    entries = load_directory()
    assert len(entries["microsoft/phi-3-mini-4k-instruct"].super_weights) == 6
    olmo = entries["allenai/olmo-1b-0724-hf"]
    assert SuperWeight(2, 1764, 8041) in olmo.super_weights
    assert "layer 1 for both" in olmo.note


def test_directory_compare():
    entry = lookup("allenai/OLMo-1B-0724-hf")
    result = compare(entry, [SuperWeight(1, 1764, 1710), SuperWeight(5, 1, 1)])
    assert not result["agrees"]
    assert result["missing"] == [SuperWeight(2, 1764, 8041).to_dict()]
    assert result["extra"] == [SuperWeight(5, 1, 1).to_dict()]
    assert compare(None, []) is None
