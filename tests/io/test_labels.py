"""The label map: ids, names, codes and sides read from the data (dataset.json, presets), never assumed to be
FLARE22's; every consumer (reports, DICOM output, flips, NSD tolerances) tested on data labelled in three
conventions: FLARE22, TotalSegmentator v2 and an nnU-Net dataset.json with ids of its own."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from embedcache.errors import EmbedcacheError, UsageError
from embedcache.io import labels
from embedcache.io.labels import FLARE22, organ_of, preset, read_label_map, resolve_label_map
from embedcache.io.nifti import write_nifti
from embedcache.io.volumes import read_geometry, read_label
from embedcache.synth.phantom import limit_target_slices

from conftest import cli, one_line, only_line_error, pydicom_dir

#: A data set's own dataset.json (nnU-Net v2): the glands at ids no public data set uses, and a lesion label.
CUSTOM = {"background": 0, "Adrenal gland left": 3, "adrenal_gland_right": 5, "liver": 1, "tumour": 9}


@pytest.mark.parametrize("name, organ, side", [
    ("adrenal_gland_right", "adrenal gland", "right"), ("right adrenal gland", "adrenal gland", "right"),
    ("Adrenal gland right", "adrenal gland", "right"), ("Adrenal_Gland_L", "adrenal gland", "left"),
    ("RAG", "adrenal gland", "right"), ("lad", "adrenal gland", "left"), ("adrenal", "adrenal gland", None),
    ("kidney_left", "kidney", "left"), ("postcava", "inferior vena cava", None), ("arota", "aorta", None),
    ("gall bladder", "gallbladder", None), ("Oesophagus", "esophagus", None)])
def test_the_names_data_sets_use_resolve_to_one_organ_and_side(name, organ, side):
    assert organ_of(name) == (organ, side)


@pytest.mark.parametrize("name", ["tumour", "kidney_cyst_left", "prostate/uterus", "left liver", "right left adrenal"])
def test_a_name_the_lookup_does_not_know_is_no_organ(name):
    assert organ_of(name) is None


@pytest.mark.parametrize("name, right, left", [("flare22", 7, 8), ("totalsegmentator", 8, 9), ("amos", 11, 12),
                                               ("btcv", 12, 13)])
def test_each_preset_finds_its_own_adrenal_glands_with_codes_and_sides(name, right, left):
    label_map = preset(name)
    assert label_map.adrenals() == (right, left)
    assert (label_map.name(right), label_map.name(left)) == ("right adrenal", "left adrenal")
    assert label_map.code(right) == ("23451007", "Adrenal gland", ("24028007", "Right"))
    assert label_map.code(left) == ("23451007", "Adrenal gland", ("7771000", "Left"))
    assert label_map.mirrored((right, left))[right] == left


def test_word_has_one_adrenal_label_for_both_glands():
    word = preset("word")
    assert word.adrenals() == (12,) and word.name(12) == "adrenal"
    assert word.code(12) == ("23451007", "Adrenal gland", None)  # no side: it holds both
    assert (word.name(3), word.name(4)) == ("left kidney", "right kidney")  # WORD puts the left kidney first


def test_totalsegmentator_ids_get_their_own_organs_never_flare22s():
    ts = preset("totalsegmentator")
    assert [ts.name(i) for i in (7, 8, 9, 52, 63)] == ["pancreas", "right adrenal", "left adrenal", "aorta",
                                                      "inferior vena cava"]
    assert ts.labelled_slices_only(63) and not ts.labelled_slices_only(8)  # the tubes rule follows the organ
    assert ts.tolerance_mm(5) == 5.0 and ts.tolerance_mm(2) == 3.0 and ts.tolerance_mm(8) == 2.0
    assert ts.name(200) == "label 200"  # an id the map lacks gets no other organ's name


@pytest.mark.parametrize("text, suffix", [
    (json.dumps({"name": "x", "labels": CUSTOM}), ".json"),  # nnU-Net v2
    (json.dumps({"labels": {str(v): k for k, v in CUSTOM.items()}}), ".json"),  # Decathlon
    (json.dumps({str(v): k for k, v in CUSTOM.items()}), ".json"),  # a small id → name map
    ("id\tname\n" + "".join(f"{v}\t{k}\n" for k, v in CUSTOM.items()), ".tsv")])
def test_every_map_format_gives_the_same_map(text, suffix, tmp_path):
    path = tmp_path / f"map{suffix}"
    path.write_text(text)
    label_map = read_label_map(path)
    assert label_map.ids == (1, 3, 5, 9) and label_map.adrenals() == (5, 3)
    assert [label_map.name(i) for i in (1, 3, 5, 9)] == ["liver", "left adrenal", "right adrenal", "tumour"]
    assert label_map.code(9) is None


@pytest.mark.parametrize("text, fragment", [
    ("{", "not a readable label map"),
    (json.dumps({"labels": {"background": 0}}), "names no label but the background"),
    (json.dumps({"labels": {"kidney": [2, 3]}}), "region of several ids"),
    (json.dumps({"labels": {"a": 3, "b": 3}}), "label 3 is named twice"),
    (json.dumps({"labels": {"a": "b"}}), "is not an id and a name"),
    (json.dumps({"labels": {"a": 70000}}), "is not an id and a name"),
    ('{"7": "right adrenal gland", "7": "left adrenal gland"}', "key '7' appears twice"),  # JSON keeps the last
    (json.dumps({"7": "right adrenal gland", "8": "Adrenal_Gland_R"}), "labels 7 and 8 both name the right adrenal"),
    (json.dumps({"labels": {"\u00b2": "liver", "7": "right adrenal gland"}}), "is not an id and a name")])
def test_a_bad_map_is_one_line_naming_the_file(text, fragment, tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(text)
    with pytest.raises(EmbedcacheError, match=fragment) as caught:
        read_label_map(path)
    assert str(path) in str(caught.value)


def test_the_map_comes_from_the_file_then_a_dataset_json_then_the_preset_then_flare22(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": CUSTOM}))
    given = tmp_path / "given.tsv"
    given.write_text("8\tadrenal_gland_right\n9\tadrenal_gland_left\n")
    assert resolve_label_map(path=given, folders=(tmp_path,))[0].adrenals() == (8, 9)
    found, fallback = resolve_label_map(folders=(tmp_path,))
    assert found.adrenals() == (5, 3) and not fallback and found.source == str(tmp_path / "dataset.json")
    assert resolve_label_map(preset_name="amos")[0].adrenals() == (11, 12)
    assert resolve_label_map() == (FLARE22, True)
    with pytest.raises(UsageError, match="disagree"):  # the data's own file against a preset that contradicts it
        resolve_label_map(preset_name="totalsegmentator", folders=(tmp_path,))


def test_a_signature_carries_its_map_and_refuses_one_that_gives_a_target_another_meaning():
    from embedcache.cache.records import DECODER_KEYS, Signature
    from embedcache.config import PreprocessConfig

    def signature(label_map, ids):
        return Signature(backbone="tiny", checkpoint_sha256="ab" * 32, input_size=1024, preprocess=PreprocessConfig(),
                         labels=ids, label_map=label_map.only(ids))

    ts = signature(preset("totalsegmentator"), (8, 9))
    assert Signature.from_dict(ts.to_dict(), source="x") == ts
    flare_8_9 = signature(FLARE22, (8, 9))  # same ids, FLARE22's meaning: left adrenal and gallbladder
    assert ts.difference(flare_8_9, DECODER_KEYS) == ("label 8: right adrenal (--label-preset totalsegmentator), "
                                                      "not left adrenal (FLARE22's ids (the default))")
    custom = labels.from_names({8: "Adrenal gland right", 9: "left adrenal"}, "dataset.json")
    assert ts.difference(signature(custom, (8, 9)), DECODER_KEYS) is None  # other words, the same organs
    old = {k: v for k, v in signature(FLARE22, (7, 8)).to_dict().items() if k != "label_map"}
    assert Signature.from_dict(old, source="x").label_map.name(7) == "right adrenal"  # caches before maps: FLARE22's


def _relabel(data, mapping: dict[int, int]) -> None:
    """Every label volume under ``data`` renumbered by ``mapping`` (ids not in it become 0), its dataset.json gone."""
    for path in sorted(data.glob("labels*/*.nii.gz")):
        volume = read_label(path)
        out = np.zeros_like(volume.array)
        for old, new in mapping.items():
            out[volume.array == old] = new
        write_nifti(out, volume.geometry, path)
    (data / "dataset.json").unlink()


#: FLARE22 → TotalSegmentator v2 for the phantom's organs: the glands move to 8/9 and the pancreas' id 7 is free
#: for the liver to stand in as "pancreas" (an organ a FLARE22 table would call the right adrenal).
TO_TOTALSEGMENTATOR = {7: 8, 8: 9, 1: 7, 2: 2, 13: 3}
#: FLARE22 → the custom dataset.json's ids.
TO_CUSTOM = {7: 5, 8: 3, 1: 1}


@pytest.fixture(scope="module")
def conventions(tmp_path_factory, phantom_dir):
    """The small phantom three times: in FLARE22's ids (its own dataset.json), TotalSegmentator's (no
    dataset.json: the preset names them) and a custom dataset.json's."""
    root = tmp_path_factory.mktemp("conventions")
    out = {}
    for name, mapping in (("flare22", None), ("totalsegmentator", TO_TOTALSEGMENTATOR), ("custom", TO_CUSTOM)):
        shutil.copytree(phantom_dir, root / name)
        limit_target_slices(root / name, per_case=1)  # in FLARE22's ids, before any renumbering
        if mapping:
            _relabel(root / name, mapping)
        out[name] = root / name
    (out["custom"] / "dataset.json").write_text(json.dumps({"name": "mine", "labels": CUSTOM}))
    return out


@pytest.mark.parametrize("convention, options, right, left", [
    ("flare22", (), 7, 8), ("totalsegmentator", ("--label-preset", "totalsegmentator"), 8, 9),
    ("custom", (), 5, 3)])
def test_encode_score_and_evaluate_name_the_glands_of_each_convention(convention, options, right, left, conventions,
                                                                      tiny_model, tmp_path):
    """Encoded with flipped copies: the copies' masks carry the right ids on the mirrored side; the cache records
    the map; score's report, CSV and page and evaluate's report name the glands; NSD tolerances by organ."""
    from embedcache.cache.store import open_cache

    data = conventions[convention]
    cache = tmp_path / "cache.h5"
    result = cli("encode", data, "--out", cache, "--model", "tiny", "--device", "cpu", "--engine", "torch",
                 "--margin-slices", "0", "--augment", "flip", "--no-progress", *options)
    assert result.exit_code == 0, result.output
    assert "FLARE22's ids" not in result.output  # the data said what its ids mean
    with open_cache(cache) as opened:
        assert opened.labels == (right, left)
        assert opened.signature.label_map.name(right) == "right adrenal"
        source, flipped = (opened.masks[opened.case(name).rows] for name in ("PHANTOM_0001", "PHANTOM_0001~flip"))
        assert source.any() and (source == right).any()
    np.testing.assert_array_equal(flipped == left, (source == right)[..., ::-1])
    np.testing.assert_array_equal(flipped == right, (source == left)[..., ::-1])
    info = cli("info", cache)
    assert f"{right} = right adrenal, {left} = left adrenal" in " ".join(info.output.split())

    report_dir = tmp_path / "report"
    result = cli("score", cache, "--out", report_dir, "--protocols", "oracle", "--cases", "all", "--device", "cpu",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    assert report["labels"] == {str(right): "right adrenal", str(left): "left adrenal"}
    assert report["nsd_tolerance_mm"] == {str(right): 2.0, str(left): 2.0}
    assert "right adrenal" in result.output and "left adrenal" in result.output and "gallbladder" not in result.output
    assert "right adrenal" in (report_dir / "index.html").read_text()

    truth = data / "labelsTr"
    pred = tmp_path / "pred"
    shutil.copytree(truth, pred)
    evaluated = cli("evaluate", pred, truth, "--out", tmp_path / "ev", "--no-progress", *options)
    assert evaluated.exit_code == 0, evaluated.output
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert ev["labels"] == {str(right): "right adrenal", str(left): "left adrenal"}
    assert "FLARE22's ids" not in evaluated.output


def test_evaluate_takes_nsd_tolerances_and_the_tubes_rule_by_organ(conventions, tmp_path):
    """The liver in TotalSegmentator's ids is 5: its 5 mm tolerance follows it; a custom id of the IVC is scored on
    its labelled slices only."""
    data = conventions["totalsegmentator"]
    pred = tmp_path / "pred"
    shutil.copytree(data / "labelsTr", pred)
    result = cli("evaluate", pred, data / "labelsTr", "--out", tmp_path / "ev", "--labels", "7,8,2",
                 "--label-preset", "totalsegmentator", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["labels"] == {"7": "pancreas", "8": "right adrenal", "2": "right kidney"}
    assert report["nsd_tolerance_mm"] == {"7": 5.0, "8": 2.0, "2": 3.0}

    from embedcache.evaluation.metrics import gland_metrics

    truth = np.zeros((10, 8, 8), bool)
    truth[3:6, 2:5, 2:5] = True
    pred_mask = truth.copy()
    pred_mask[7, 2:5, 2:5] = True  # beyond the labelled slices
    ivc = labels.from_names({40: "inferior_vena_cava", 41: "adrenal_gland_left"}, "custom")
    tube = gland_metrics(pred_mask, truth, spacing_mm=(1, 1, 1), label=40, label_map=ivc)
    gland = gland_metrics(pred_mask, truth, spacing_mm=(1, 1, 1), label=41, label_map=ivc)
    assert tube["dice"] == 1.0 and gland["dice"] < 1.0


def test_without_a_map_the_cli_says_it_reads_flare22s_ids_once_at_the_end(conventions, tmp_path):
    pred = tmp_path / "pred"
    shutil.copytree(conventions["totalsegmentator"] / "labelsTr", pred)
    truth = tmp_path / "truth"
    shutil.copytree(conventions["totalsegmentator"] / "labelsTr", truth)
    result = cli("evaluate", pred, truth, "--out", tmp_path / "ev", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.output.count("FLARE22's ids (7 = right adrenal, 8 = left adrenal)") == 1
    assert "--label-preset" in result.output


def test_encode_refuses_a_flip_of_a_label_without_a_known_side_and_a_map_naming_no_gland(conventions, tmp_path):
    data = conventions["custom"]
    only_line_error(cli("encode", data, "--out", tmp_path / "c.h5", "--labels", "9", "--augment", "flip",
                        "--model", "tiny"), "label 9", "tumour", "drop flip")
    assert not (tmp_path / "c.h5").exists()
    nameless = tmp_path / "map.tsv"
    nameless.write_text("9\ttumour\n")
    only_line_error(cli("encode", data, "--out", tmp_path / "c.h5", "--label-map", nameless, "--model", "tiny"),
                    "names no adrenal gland", "--labels")
    only_line_error(cli("encode", data, "--out", tmp_path / "c.h5", "--label-map", nameless, "--label-preset", "amos"),
                    "not both")


@pytest.fixture
def ct5n_in(tmp_path):
    """pydicom's real 5-slice CT series, and two glands on its grid labelled ``right`` and ``left``."""

    def make(right: int, left: int):
        folder = tmp_path / "CT5N_0000"
        shutil.copytree(pydicom_dir("dicomdirtests/98892001/CT5N"), folder)
        geometry = read_geometry(folder)
        out = np.zeros(geometry.shape_zyx, np.uint8)
        z0, u = geometry.shape_zyx[0] // 2 - 1, geometry.shape_zyx[1] // 16
        out[z0:z0 + 3, 3 * u:10 * u, 2 * u:8 * u] = right
        out[z0 + 1:z0 + 3, 9 * u:14 * u, 10 * u:14 * u] = left
        (tmp_path / "labels").mkdir()
        write_nifti(out, geometry, tmp_path / "labels" / "CT5N.nii.gz")
        return folder, tmp_path / "labels" / "CT5N.nii.gz"

    return make


@pytest.mark.parametrize("convention, right, left", [("totalsegmentator", 8, 9), ("custom", 5, 3)])
def test_dicom_output_codes_each_gland_with_its_own_side(convention, right, left, ct5n_in, tiny_model, tmp_path):
    """A SEG whose segments highdicom reads as Adrenal gland, Right / Left for the data's own ids; RT ROIs named so;
    the SEG read back by evaluate onto the same ids."""
    pytest.importorskip("highdicom", reason="DICOM output needs the dicom extra (pip install 'embedcache[dicom]')")
    pytest.importorskip("rt_utils", reason="RT Structure Set output needs the dicom extra")
    import highdicom as hd
    import pydicom

    from embedcache.io.dicom_out import read_seg, write_seg

    series, label = ct5n_in(right, left)
    if convention == "custom":
        (label.parent / "dataset.json").write_text(json.dumps({"labels": CUSTOM}))
        options = ()
    else:
        options = ("--label-preset", "totalsegmentator")
    result = cli("predict", series, "--from-labels", label, "--protocol", "oracle", "--model", "tiny", "--device",
                 "cpu", "--output-type", "nifti,dicom-seg,rtstruct", "--out", tmp_path / "pred", "--no-progress",
                 *options)
    assert result.exit_code == 0, result.output
    label_map = preset("totalsegmentator") if convention != "custom" else read_label_map(label.parent / "dataset.json")
    expected = {"right adrenal": ("23451007", "Adrenal gland", "24028007", "Right"),
                "left adrenal": ("23451007", "Adrenal gland", "7771000", "Left")}
    predicted = read_label(tmp_path / "pred" / "CT5N.nii.gz").array
    assert set(np.unique(predicted)) <= {0, right, left} and (predicted == right).any()
    # the tiny decoder may miss the 16-px series' small left gland: the truth itself, written as predict writes it
    truth = tmp_path / "truth.seg.dcm"
    write_seg(truth, series, read_geometry(series).to_source(read_label(label).array), series_uid=None,
              label_ids=(right, left), label_map=label_map, decoder="test", semiautomatic=True)
    for path in (truth, tmp_path / "pred" / "CT5N.seg.dcm"):
        found = {}
        for item in hd.seg.segread(path).SegmentSequence:
            kind = item.SegmentedPropertyTypeCodeSequence[0]
            side = kind.SegmentedPropertyTypeModifierCodeSequence[0]
            found[item.SegmentLabel] = (kind.CodeValue, kind.CodeMeaning, side.CodeValue, side.CodeMeaning)
        present = {name for name, k in (("right adrenal", right), ("left adrenal", left))
                   if (read_label(label).array == k).any() and (path == truth or (predicted == k).any())}
        assert found == {name: expected[name] for name in present}, path
    rt = pydicom.dcmread(tmp_path / "pred" / "CT5N.rtstruct.dcm")
    assert {r.ROIName for r in rt.StructureSetROISequence} == {n for n, k in (("right adrenal", right),
                                                                             ("left adrenal", left))
                                                               if (predicted == k).any()}
    np.testing.assert_array_equal(read_seg(tmp_path / "pred" / "CT5N.seg.dcm", read_geometry(series),
                                           label_map=label_map), predicted)
    review = json.loads((tmp_path / "pred" / "CT5N.review.json").read_text())
    assert {g["label"]: g["name"] for g in review["glands"]} == {right: "right adrenal", left: "left adrenal"}
    saved = json.loads((tmp_path / "pred" / "predict.json").read_text())
    assert {e["id"]: e["organ"] for e in saved["label_map"]["labels"]}[right] == "adrenal gland"


def test_dicom_output_of_a_label_the_map_cannot_code_is_refused_before_anything_is_written(ct5n_in, tiny_model,
                                                                                            tmp_path):
    pytest.importorskip("highdicom", reason="DICOM output needs the dicom extra (pip install 'embedcache[dicom]')")
    series, label = ct5n_in(5, 3)
    (label.parent / "dataset.json").write_text(json.dumps({"labels": CUSTOM}))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"CT5N": [{"label": 9, "slice": 2, "box": [2, 2, 10, 10]}]}))
    result = cli("predict", series, "--boxes", boxes, "--model", "tiny", "--device", "cpu", "--label-map",
                 label.parent / "dataset.json", "--output-type", "dicom-seg", "--out", tmp_path / "pred",
                 "--no-progress")
    one_line(result, "1 input(s) failed")  # an input's error, then the run's line
    assert "error: label 9 is named 'tumour', which embedcache cannot code" in result.output
    assert "--label-map" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "pred").exists()


def test_a_decoder_and_a_cache_whose_maps_disagree_are_refused_naming_both(conventions, tiny_model, tmp_path):
    """A run trained on TotalSegmentator's 8/9 scores no cache whose 8/9 mean FLARE22's left adrenal and
    gallbladder; predict with that run and a FLARE22 map given beside it is refused too."""
    ts, flare = tmp_path / "ts.h5", tmp_path / "flare.h5"
    for data, cache, options in ((conventions["totalsegmentator"], ts, ("--label-preset", "totalsegmentator")),
                                 (conventions["flare22"], flare, ("--labels", "8,9", "--label-preset", "flare22"))):
        result = cli("encode", data, "--out", cache, "--model", "tiny", "--device", "cpu", "--engine", "torch",
                     "--margin-slices", "0", "--no-progress", *options)
        assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    result = cli("finetune", ts, "--out", run, "--epochs", "1", "--batch-size", "2", "--device", "cpu",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    one_line(cli("score", flare, "--run", run, "--out", tmp_path / "r", "--device", "cpu"),
             "label 8: right adrenal (--label-preset totalsegmentator)", "not left adrenal")
    series = tmp_path / "in.nii.gz"
    shutil.copy(next((conventions["totalsegmentator"] / "imagesTr").iterdir()), series)
    one_line(cli("predict", series, "--run", run, "--from-labels", conventions["totalsegmentator"] / "labelsTr",
                 "--label-preset", "flare22", "--out", tmp_path / "p", "--device", "cpu"),
             "disagree", "label 8", code=2)
    assert not (tmp_path / "p").exists()
    # the FLARE22 labels' own dataset.json beside --from-labels says the same without being asked
    one_line(cli("predict", series, "--run", run, "--from-labels", conventions["flare22"] / "labelsTr",
                 "--out", tmp_path / "p", "--device", "cpu"), "dataset.json disagree", "label 8", code=2)
