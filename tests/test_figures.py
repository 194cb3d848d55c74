"""Figures and the HTML report, on tiny models with a planted super weight and hand-written result folders."""

import json
import math

import numpy as np
import pytest
import torch

from superweight import figures
from superweight.cli import main
from superweight.coordinates import SuperWeight
from superweight.detect import detect_super_weights
from superweight.interventions import pruned_super_weights
from superweight.models import LoadedModel
from superweight.report import ReportConfig, build_report, write_report
from tiny_models import ByteTokenizer, assert_bit_identical, make_model, plant_super_weight, state_snapshot

PLANTED = SuperWeight(layer=1, row=5, col=17)
PROMPT = "Apple Inc. is a worldwide tech company."
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class DecodingByteTokenizer(ByteTokenizer):
    """ByteTokenizer that also decodes, as the stop-word figure labels tokens by their text."""

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def tiny():
    model = make_model("llama")
    plant_super_weight(model, PLANTED.layer, PLANTED.row, PLANTED.col)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return DecodingByteTokenizer()


@pytest.fixture(scope="module")
def tiny_loaded(tiny, tokenizer):
    return LoadedModel(tiny, tokenizer, "tiny-llama", "test", None, None, torch.float32, "cpu")


def assert_image_file(path, kind):
    data = path.read_bytes()
    assert 5_000 < len(data) < 3_000_000, f"{path} has {len(data)} bytes"
    if kind == "png":
        assert data.startswith(PNG_MAGIC)
    else:
        assert data.startswith(b"%PDF")
        assert b"%%EOF" in data[-1024:]


# -- detection ---------------------------------------------------------------------------


def test_detection_figure_plots_report(tiny, tokenizer, tmp_path):
    report = detect_super_weights(tiny, tokenizer, prompt=PROMPT)

    result = figures.detection_figure(report, model_label="tiny-llama")
    paths = result.save(tmp_path, ["png", "pdf"])

    assert result.data["max_input"] == [s.max_input for s in report.layers]
    assert result.data["max_output"] == [s.max_output for s in report.layers]
    ax_in, ax_out = result.figure.axes
    assert list(ax_in.lines[0].get_ydata()) == result.data["max_input"]
    assert list(ax_out.lines[0].get_ydata()) == result.data["max_output"]
    marked = {(m["layer"], m["row"], m["col"]) for m in result.data["marks"]}
    assert (PLANTED.layer, PLANTED.row, PLANTED.col) in marked
    assert {m["status"] for m in result.data["marks"]} == {"candidate"}
    assert [p.name for p in paths] == ["detection.png", "detection.pdf"]
    assert_image_file(paths[0], "png")
    assert_image_file(paths[1], "pdf")


def test_detection_figure_marks_verified_status(tiny, tokenizer):
    report = detect_super_weights(tiny, tokenizer, prompt=PROMPT, verify=True, confirm_ratio=1.5)

    result = figures.detection_figure(report, log_scale=True)

    status = {SuperWeight(m["layer"], m["row"], m["col"]): m["status"] for m in result.data["marks"]}
    assert status == {c.super_weight: c.status for c in report.candidates}
    assert set(status.values()) <= {"confirmed", "rejected"}
    assert result.data["verified"] is True
    assert result.figure.axes[0].get_yscale() == "log"
    assert "causal test" in result.caption


# -- residual stream ---------------------------------------------------------------------


def test_residual_maxima_match_hidden_states(tiny, tokenizer):
    snapshot = state_snapshot(tiny)

    maxima = figures.residual_maxima(tiny, tokenizer, [PLANTED], prompt=PROMPT)

    ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        hidden = tiny(input_ids=ids, output_hidden_states=True).hidden_states
        with pruned_super_weights(tiny, [PLANTED]):
            hidden_pruned = tiny(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is the output of layer i; the last one has the final norm applied.
    num_layers = len(hidden) - 1
    expected = [hidden[i + 1].abs().max().item() for i in range(num_layers - 1)]
    expected_pruned = [hidden_pruned[i + 1].abs().max().item() for i in range(num_layers - 1)]
    assert maxima.maxima["original"][:-1] == pytest.approx(expected, rel=1e-6)
    assert maxima.maxima["sw-removed"][:-1] == pytest.approx(expected_pruned, rel=1e-6)
    assert maxima.channels["original"][PLANTED.layer] == PLANTED.row
    assert maxima.maxima["sw-removed"][PLANTED.layer] < maxima.maxima["original"][PLANTED.layer] / 5
    assert maxima.maxima["outliers-removed-sw-kept"][PLANTED.layer] > maxima.maxima["outliers-removed"][PLANTED.layer]
    assert maxima.outliers_zeroed["outliers-removed"] == maxima.outliers_zeroed["outliers-removed-sw-kept"] + 1
    assert maxima.super_weights_zeroed["original"] == []
    assert maxima.super_weights_zeroed["sw-removed"] == [PLANTED]
    assert maxima.super_weights_zeroed["outliers-removed"] == [PLANTED]
    assert maxima.super_weights_zeroed["outliers-removed-sw-kept"] == []
    assert_bit_identical(tiny, snapshot)


def test_residual_figure_plots_each_condition(tiny, tokenizer):
    maxima = figures.residual_maxima(tiny, tokenizer, [PLANTED], prompt=PROMPT,
                                     conditions=("original", "sw-removed", "sa-restored"))

    result = figures.residual_figure(maxima, log_scale=True, model_label="tiny-llama")

    (ax,) = result.figure.axes[:1]
    plotted = {line.get_label(): list(line.get_ydata()) for line in ax.lines if not line.get_label().startswith("_")}
    for condition, values in maxima.maxima.items():
        assert plotted[figures.RESIDUAL_CONDITIONS[condition][0]] == values
    restored = maxima.maxima["sa-restored"][PLANTED.layer]
    assert restored == pytest.approx(maxima.maxima["original"][PLANTED.layer], rel=1e-4)
    assert result.data["maxima"] == maxima.maxima


def test_residual_rejects_unknown_condition(tiny, tokenizer):
    with pytest.raises(ValueError, match="choose from original"):
        figures.residual_maxima(tiny, tokenizer, [PLANTED], conditions=("original", "typo"))


# -- activations -------------------------------------------------------------------------


def test_activations_figure_shows_super_activation(tiny, tokenizer, tmp_path):
    activations = figures.down_proj_activations(tiny, tokenizer, PLANTED.layer, prompt=PROMPT)

    result = figures.activations_figure(activations, super_weights=[PLANTED], model_label="tiny-llama")
    (path,) = result.save(tmp_path, "png")

    assert activations.values.shape == (len(PROMPT), 64)
    assert result.data["peak"]["channel"] == PLANTED.row
    assert result.data["values"] == np.abs(activations.values).tolist()
    shown = np.asarray(result.figure.axes[1].images[0].get_array())
    vmin = result.data["color_range"][0]
    assert np.array_equal(shown, np.clip(np.abs(activations.values), vmin, None))
    assert [t.get_text().split()[0] for t in result.figure.axes[1].get_yticklabels()][:5] == ["A", "p", "p", "l", "e"]
    assert_image_file(path, "png")


def test_activations_pooling_keeps_spike(tiny, tokenizer):
    activations = figures.down_proj_activations(tiny, tokenizer, PLANTED.layer, prompt=PROMPT)

    result = figures.activations_figure(activations, max_columns=16)

    image = np.asarray(result.data["image"])
    assert result.data["bin_width"] == 4
    assert image.shape == (len(PROMPT), 16)
    assert image.max() == np.abs(activations.values).max()
    assert int(np.unravel_index(image.argmax(), image.shape)[1]) == PLANTED.row // 4


# -- stop words --------------------------------------------------------------------------


def test_next_token_probabilities_match_unbatched(tiny, tokenizer):
    prompts = ["The cat sat", "A much longer prompt about a river town", "Hi", "Once upon a time there"]

    batched = figures.next_token_probabilities(tiny, tokenizer, prompts, [PLANTED], batch_size=3, progress=False)

    def mean_probabilities():
        rows = []
        with torch.no_grad():
            for prompt in prompts:
                logits = tiny(input_ids=tokenizer(prompt).input_ids).logits[0, -1]
                rows.append(torch.softmax(logits.double(), dim=-1))
        return torch.stack(rows).mean(0).numpy()

    expected = mean_probabilities()
    with pruned_super_weights(tiny, [PLANTED]):
        expected_removed = mean_probabilities()
    np.testing.assert_allclose(batched.original, expected, atol=1e-6)
    np.testing.assert_allclose(batched.removed, expected_removed, atol=1e-6)
    assert batched.num_tokens == sum(len(p) for p in prompts)
    assert not np.allclose(batched.original, batched.removed)


def test_stopwords_figure_plots_probabilities(tiny, tokenizer, tmp_path):
    prompts = ["The cat sat on the", "She said that the", "It was a", "We went to the"]
    probabilities = figures.next_token_probabilities(tiny, tokenizer, prompts, [PLANTED], batch_size=2,
                                                     progress=False)

    result = figures.stopwords_figure(probabilities, tokenizer, top_k=5, model_label="tiny-llama")
    paths = result.save(tmp_path, "png,pdf")

    ids = result.data["token_ids"]
    assert ids[:5] == np.argsort(-probabilities.original, kind="stable")[:5].tolist()
    assert result.data["original"] == [float(probabilities.original[i]) for i in ids]
    assert result.data["removed"] == [float(probabilities.removed[i]) for i in ids]
    ax = result.figure.axes[0]
    heights = [patch.get_height() for patch in ax.patches if patch.get_width() == pytest.approx(0.4)]
    assert heights == result.data["original"] + result.data["removed"]
    for original, removed, ratio in zip(result.data["original"], result.data["removed"], result.data["ratio"]):
        assert ratio == pytest.approx(removed / original)
    assert result.data["stop_word"] == [figures.is_stop_word(t) for t in result.data["tokens"]]
    assert_image_file(paths[0], "png")
    assert_image_file(paths[1], "pdf")


def test_stopwords_rejects_empty_inputs(tiny, tokenizer):
    with pytest.raises(ValueError, match="no prompts"):
        figures.next_token_probabilities(tiny, tokenizer, [], [PLANTED])
    with pytest.raises(ValueError, match="no super weights"):
        figures.next_token_probabilities(tiny, tokenizer, ["text"], [])


def test_lambada_prompts_drop_last_word():
    from superweight import tasks

    with open(tasks.rebuilt_split("lambada_openai"), encoding="utf-8") as handle:
        texts = [json.loads(next(handle))["text"] for _ in range(3)]

    prompts = figures.lambada_prompts(3)

    assert [p + " " + t[len(p) + 1:] for p, t in zip(prompts, texts)] == texts
    assert all(" " not in t[len(p) + 1:] for p, t in zip(prompts, texts))
    with pytest.raises(ValueError, match="num_prompts"):
        figures.lambada_prompts(0)


# -- result folders ----------------------------------------------------------------------


def _write_folder(root, experiment, runs, configurations=None, settings=None):
    root.mkdir(parents=True)
    (root / "runs").mkdir()
    names = configurations or [run["name"] for run in runs]
    manifest = {"experiment": experiment, "model": "tiny-llama", "settings": settings or {},
                "configurations": names, "provenance": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    for run in runs:
        (root / "runs" / f"{run['name']}.json").write_text(json.dumps(run))
    return root


def _run(name, settings, accs, ppl):
    tasks = {task: {"acc": acc, "acc_stderr": 0.01} for task, acc in zip(("arc_easy", "piqa"), accs)}
    return {"name": name, "label": name, "settings": settings, "tasks": tasks,
            "average_accuracy": sum(accs) / len(accs), "perplexity": {"wiki-sample": {"perplexity": ppl}}}


@pytest.fixture
def sensitivity_dir(tmp_path):
    runs = [_run("scale-1", {"factor": 1.0}, [0.6, 0.7], 20.0), _run("scale-0", {"factor": 0.0}, [0.3, 0.5], 900.0),
            _run("scale-2", {"factor": 2.0}, [0.62, 0.7], 19.0)]
    return _write_folder(tmp_path / "sensitivity", "sensitivity", runs,
                         configurations=["scale-0", "scale-0.5", "scale-1", "scale-2"])


@pytest.fixture
def weight_quant_dir(tmp_path):
    runs = [_run("original", {}, [0.6, 0.7], 20.0)]
    for method, penalty in (("rtn", 0.1), ("sw-aware", 0.03)):
        for step, block in enumerate((16384, 65536, "tensor")):
            runs.append(_run(f"{method}-{block}", {"method": method, "block_size": block, "bits": 4},
                             [0.6 - penalty * step, 0.7 - penalty * step], 20.0 + 10 * penalty * step))
    return _write_folder(tmp_path / "weight-quant", "weight-quant", runs)


@pytest.fixture
def table1_dir(tmp_path):
    return _write_folder(tmp_path / "table1", "table1", [_run("original", {}, [0.6, 0.7], 20.0)])


def test_sensitivity_figure_reads_runs(sensitivity_dir, tmp_path):
    result = figures.draw_results_figure("sensitivity", sensitivity_dir)
    (path,) = result.save(tmp_path / "out")

    assert result.data["factors"] == [0.0, 1.0, 2.0]
    assert result.data["accuracy"] == pytest.approx([40.0, 65.0, 66.0])
    assert result.data["accuracy_stderr"] == pytest.approx([math.sqrt(2) / 2] * 3)
    assert result.data["perplexity"] == {"wiki-sample": [900.0, 20.0, 19.0]}
    assert result.data["missing"] == ["scale-0.5"]
    ax_acc, ax_ppl = result.figure.axes
    assert list(ax_acc.lines[0].get_ydata()) == pytest.approx(result.data["accuracy"])
    assert list(ax_ppl.lines[0].get_ydata()) == result.data["perplexity"]["wiki-sample"]
    assert_image_file(path, "png")


def test_weight_quant_figure_orders_blocks(weight_quant_dir):
    result = figures.draw_results_figure("weight-quant", weight_quant_dir)

    assert result.data["block_sizes"] == [16384, 65536, "tensor"]
    assert result.data["block_labels"] == ["128²", "256²", "whole\ntensor"]
    assert result.data["methods"] == ["rtn", "sw-aware"]
    assert result.data["accuracy"]["rtn"] == pytest.approx([65.0, 55.0, 45.0])
    assert result.data["accuracy"]["sw-aware"] == pytest.approx([65.0, 62.0, 59.0])
    assert result.data["baseline_accuracy"] == pytest.approx(65.0)
    assert result.data["bits"] == 4
    ax_acc = result.figure.axes[0]
    assert list(ax_acc.lines[1].get_ydata()) == pytest.approx(result.data["accuracy"]["sw-aware"])


def test_results_figure_rejects_wrong_experiment(table1_dir):
    with pytest.raises(figures.ResultFolderError, match="'table1' experiment") as error:
        figures.draw_results_figure("sensitivity", table1_dir)
    assert "superweight reproduce sensitivity tiny-llama --output DIR" in str(error.value)


def test_results_figure_rejects_folder_without_manifest(tmp_path):
    with pytest.raises(figures.ResultFolderError, match="no manifest.json"):
        figures.draw_results_figure("weight-quant", tmp_path)


# -- command line ------------------------------------------------------------------------


def test_cli_unknown_figure_lists_names(tmp_path, capsys):
    assert main(["figure", "histogram", "-o", str(tmp_path)]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "unknown figure 'histogram'" in message
    for name in figures.FIGURES:
        assert name in message


def test_cli_wrong_result_folder_names_experiment(table1_dir, tmp_path, capsys):
    assert main(["figure", "weight-quant", str(table1_dir), "-o", str(tmp_path / "out")]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "'table1' experiment" in message
    assert "superweight reproduce weight-quant" in message


def test_cli_model_figure_rejects_result_folder(table1_dir, tmp_path, capsys):
    assert main(["figure", "detection", str(table1_dir), "-o", str(tmp_path / "out")]) == 2
    assert "result folder of the 'table1' experiment" in " ".join(capsys.readouterr().err.split())


def test_cli_unwritable_output(sensitivity_dir, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")

    assert main(["figure", "sensitivity", str(sensitivity_dir), "-o", str(blocker)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert main(["figure", "sensitivity", str(sensitivity_dir), "-o", str(blocker / "sub")]) == 2
    assert "cannot write to output folder" in " ".join(capsys.readouterr().err.split())


def test_cli_writes_result_figure(sensitivity_dir, tmp_path):
    out = tmp_path / "out"

    assert main(["figure", "sensitivity", str(sensitivity_dir), "-o", str(out), "--format", "png,pdf",
                 "--save-data"]) == 0

    assert_image_file(out / "sensitivity.png", "png")
    assert_image_file(out / "sensitivity.pdf", "pdf")
    assert json.loads((out / "sensitivity.json").read_text())["data"]["factors"] == [0.0, 1.0, 2.0]


def test_cli_rejects_bad_format(sensitivity_dir, tmp_path, capsys):
    assert main(["figure", "sensitivity", str(sensitivity_dir), "-o", str(tmp_path), "--format", "png,gif"]) == 2
    assert "not supported" in capsys.readouterr().err


# -- report ------------------------------------------------------------------------------


def test_report_contains_every_section(tiny_loaded, sensitivity_dir, weight_quant_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    config = ReportConfig(options=figures.FigureOptions(num_prompts=4, batch_size=2))
    steps = []

    html = build_report(tiny_loaded, results=[sensitivity_dir, weight_quant_dir, broken], config=config,
                        super_weights=[PLANTED], on_step=steps.append)
    path = write_report(tmp_path / "report.html", html)

    for section in ("header", "super-weights", "directory", "figures", "figure-detection", "figure-residual",
                    "figure-activations", "figure-stopwords", "results", "results-sensitivity",
                    "results-weight-quant", "figure-sensitivity", "figure-weight-quant", "missing"):
        assert f'id="{section}"' in html, section
    assert html.count("data:image/png;base64,") == 6
    assert "tiny-llama" in html
    assert "float32" in html
    assert "torch " in html  # package versions in the header
    assert "superweight reproduce table1 tiny-llama --output DIR" in html
    assert "superweight reproduce activation-quant tiny-llama --output DIR" in html
    assert "scale-0.5" in html  # a configuration without a finished run
    assert "no manifest.json" in html
    assert "layer 1 [5, 17]" in html
    for external in ("http://", "https://", "<script", "<link", "@import"):
        assert external not in html
    assert steps[0] == "detecting super weights"
    assert path.read_text(encoding="utf-8") == html


def test_report_notes_figures_without_super_weights(tokenizer):
    plain = make_model("llama", seed=1)
    loaded = LoadedModel(plain, tokenizer, "plain-llama", "test", None, None, torch.float32, "cpu")
    config = ReportConfig(figures=("detection", "residual"))

    html = build_report(loaded, config=config)

    assert 'id="figure-detection"' in html
    assert 'id="figure-residual"' not in html
    assert "needs super weights" in html
    assert "--super-weight LAYER:ROW:COL" in html


def test_report_rejects_result_figure_names():
    with pytest.raises(ValueError, match="--results"):
        ReportConfig(figures=("detection", "sensitivity"))


def test_write_report_rejects_folder(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        write_report(tmp_path, "<html></html>")


# -- the real default model ----------------------------------------------------------------


@pytest.mark.slow
def test_default_model_detection_spike_is_marked(default_model, tmp_path):
    result = figures.draw_model_figure("detection", default_model)

    outputs = result.data["max_output"]
    assert outputs.index(max(outputs)) == 11
    known = {(m["layer"], m["row"], m["col"]) for m in result.data["marks"] if m["status"] == "known"}
    assert known == {(11, 507, 1229), (11, 507, 1487)}
    assert_image_file(result.save(tmp_path)[0], "png")


@pytest.mark.slow
def test_default_model_activations_peak_at_row(default_model):
    result = figures.draw_model_figure("activations", default_model)

    assert result.data["layer"] == 11
    assert result.data["peak"]["channel"] == 507
    assert result.data["peak"]["token"] == 0
    assert abs(result.data["peak"]["value"]) > 1000


@pytest.mark.slow
def test_default_model_stopwords_decode_tokens(default_model):
    options = figures.FigureOptions(num_prompts=8, batch_size=8)

    result = figures.draw_model_figure("stopwords", default_model, options, progress=False)

    assert result.data["num_prompts"] == 8
    assert " the" in result.data["tokens"]
    assert all(isinstance(t, str) and t for t in result.data["tokens"])
