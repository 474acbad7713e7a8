"""The notebooks in notebooks/ run top to bottom without error (with
JAX_BRGEMM_NOTEBOOK_QUICK=1: shorter training and timing), the digits MLP and CNN reach
their test accuracy, and the committed files carry their outputs, plots included."""

import json
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 240  # seconds per cell, generous for a shared 2-core machine

# Test accuracy on the held-out quarter of load_digits after the quick run's epochs (MLP 15,
# CNN 20). A correct implementation reaches about 0.97-0.98 (the committed full runs: MLP
# 0.976 after 30 epochs, CNN 0.980); the bound leaves room for run-to-run noise.
MIN_ACCURACY = {"2_mlp_digits.ipynb": 0.95, "3_cnn_digits.ipynb": 0.95}

# Notebook 5 trains each model twice from the same weights on the same batches, stock and
# through jb.optimize; the quick run's final losses (mean of the last 3 of 6 steps) agree to
# well under 1 % (a ReLU decision flipped by rounding moves later steps a little), so 5 %
# catches a rewrite that changes the computation. Every convolution and matmul of both
# models is large enough to be served (ResNet-18: 20 convolutions, 20 training-mode
# BatchNorms and the head; the Equinox CNN: 4 convolutions and 2 linear layers).
MAX_LOSS_GAP = 0.05
# Ops optimize puts on the kernel in notebook 5: every convolution (ResNet-18's 20 and its
# max pool, the Equinox CNN's 5) and ResNet-18's 20 BatchNorms (with their relu / residual
# add); the small classifier heads fall under the matmul size threshold.
SERVED = {"resnet_served": 41, "eqx_served": 5}
# Notebook 6: after the quick run's 20 steps the character transformer's training loss is
# about 3.0 nats per character (uniform guessing: log 96 = 4.56); the bound fails for a
# model that does not learn. The trained state loaded into the stock Flax model gives the
# same held-out loss.
MAX_TRANSFORMER_LOSS = 3.5


RESULTS = ("test_accuracy", "accuracy16", "resnet_loss_gap", "eqx_loss_gap", "resnet_served",
           "eqx_served", "final_loss", "ours_loss", "stock_loss")


def execute(path, monkeypatch):
    monkeypatch.setenv("JAX_BRGEMM_NOTEBOOK_QUICK", "1")  # the kernel inherits the environment
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json\n"
        f"print('RESULT', json.dumps({{k: float(v) for k, v in globals().items() if k in {RESULTS!r}}}))"))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    return json.loads(text.split("RESULT", 1)[1])


def test_there_are_six_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["1_", "2_", "3_", "4_", "5_", "6_"], NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "run the notebook top to bottom before committing"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "no plot embedded"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs(path, monkeypatch):
    result = execute(path, monkeypatch)
    if path.name in MIN_ACCURACY:
        assert result["test_accuracy"] >= MIN_ACCURACY[path.name], result
    if "accuracy16" in result:  # the trained parameters under bfloat16 compute (CNN)
        assert result["accuracy16"] >= MIN_ACCURACY[path.name], result
    if path.name == "5_any_model.ipynb":
        assert result["resnet_loss_gap"] < MAX_LOSS_GAP and result["eqx_loss_gap"] < MAX_LOSS_GAP, result
        assert all(result[k] >= n for k, n in SERVED.items()), result
    if path.name == "6_char_transformer.ipynb":
        assert result["final_loss"] < MAX_TRANSFORMER_LOSS, result
        assert abs(result["ours_loss"] - result["stock_loss"]) < 1e-3 * result["stock_loss"], result
