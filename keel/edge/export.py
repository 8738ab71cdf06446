"""ONNX graphs of Keel models: LightGBM through onnxmltools, PyTorch through ``torch.onnx``.

Both graphs take the encoded features (`keel_edge.contract`) and return one raw logit per
row; the runtime subtracts the class-weight offset and applies the sigmoid in float64, as the
native models do. The INT8 variant quantises the network's weights and activations with
onnxruntime's static quantisation, calibrated on training rows; trees have no INT8 form.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from keel import schema
from keel_edge.contract import Contract

if TYPE_CHECKING:
    import pandas as pd

    from keel.training import LightGBMRiskModel, RiskModel, TorchRiskModel

OPSET = 17
# The newest opset onnxmltools 1.16 converts to.
LIGHTGBM_OPSET = 15
LIGHTGBM_INPUTS = ("features",)
NETWORK_INPUTS = ("free", "monotone", "categories")
OUTPUT = "logit"
# Rows (of the validation window) that calibrate the INT8 activation ranges, at most.
CALIBRATION_ROWS = 20_000

# The on-demand view's ratios (keel.features.account_ratios) as contract data: one definition,
# the dataset's.
ON_DEMAND_RATIOS = schema.ON_DEMAND_RATIOS


def feature_contract(model: RiskModel) -> Contract:
    """The contract a bundle of ``model`` carries: features, encoding, on-demand ratios."""
    encoder = model.encoder
    numeric = set(encoder.numeric)
    if model.family == "lightgbm":
        graph_inputs, extra = LIGHTGBM_INPUTS, {}
    else:
        graph_inputs = NETWORK_INPUTS
        extra = {"mean": encoder.mean, "std": encoder.std, "monotone": encoder.monotone}
    return Contract(
        family=model.family,
        numeric=encoder.numeric,
        categories=encoder.categories,
        on_demand=tuple(ratio for ratio in ON_DEMAND_RATIOS if ratio.name in numeric),
        logit_offset=float(model.logit_offset),
        graph_inputs=graph_inputs,
        **extra,
    )


def lightgbm_onnx(model: LightGBMRiskModel) -> bytes:
    """The booster's trees as an ONNX ``TreeEnsembleRegressor`` that outputs the raw score.

    The graph takes the features in float64 and compares them with float64 thresholds
    (`_double_thresholds`); the tree sum itself comes out in float32, as the operator defines.

    onnxmltools converts a binary booster into a classifier that applies the sigmoid in
    float32; relabelling the objective as regression keeps the same trees and gives the raw
    sum, so the runtime can take off the class-weight offset exactly as the native model does.
    """
    import lightgbm
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    text = model.booster.model_to_string()
    objective = next(line for line in text.splitlines() if line.startswith("objective="))
    if not objective.startswith("objective=binary"):
        raise ValueError(f"expected a binary LightGBM model, got {objective!r}")
    raw = text.replace(objective, "objective=regression", 1).replace(
        "[objective: binary]", "[objective: regression]", 1
    )
    booster = lightgbm.Booster(model_str=raw)
    width = len(model.feature_names)
    graph = onnxmltools.convert_lightgbm(
        booster,
        name="keel_lightgbm",
        initial_types=[(LIGHTGBM_INPUTS[0], FloatTensorType([None, width]))],
        target_opset=LIGHTGBM_OPSET,
        zipmap=False,
    )
    graph.graph.output[0].name = _rename_output(graph)
    _double_thresholds(graph, model.booster.dump_model())
    return graph.SerializeToString()


def _double_thresholds(graph, dump: dict) -> None:  # graph: onnx.ModelProto
    """Compare features in float64 against LightGBM's own float64 thresholds.

    onnxmltools writes thresholds as float32 and the input as float32; a value just above a
    threshold can then round onto it and take the other branch. ``ai.onnx.ml`` opset 3 takes
    thresholds as a double tensor and a double input, which is how LightGBM compares. Each
    float32 threshold is matched back to the tree's float64 threshold it came from.
    """
    from onnx import TensorProto, helper, numpy_helper

    exact: dict[tuple[int, int, float], set[float]] = {}

    def walk(tree: int, node: dict) -> None:
        if "split_feature" not in node:
            return
        if isinstance(node["threshold"], int | float):
            key = (tree, node["split_feature"], float(np.float32(node["threshold"])))
            exact.setdefault(key, set()).add(float(node["threshold"]))
        walk(tree, node["left_child"])
        walk(tree, node["right_child"])

    for index, tree in enumerate(dump["tree_info"]):
        walk(index, tree["tree_structure"])
    (trees,) = [node for node in graph.graph.node if node.op_type == "TreeEnsembleRegressor"]
    attributes = {attribute.name: attribute for attribute in trees.attribute}
    thresholds = []
    for tree, feature, value, mode in zip(
        attributes["nodes_treeids"].ints,
        attributes["nodes_featureids"].ints,
        attributes["nodes_values"].floats,
        attributes["nodes_modes"].strings,
        strict=True,
    ):
        found = exact.get((tree, feature, float(value)), set()) if mode == b"BRANCH_LEQ" else set()
        # Category codes (BRANCH_EQ) are small integers, exact in float32 already.
        thresholds.append(next(iter(found)) if len(found) == 1 else float(value))
    trees.attribute.remove(attributes["nodes_values"])
    trees.attribute.append(
        helper.make_attribute(
            "nodes_values_as_tensor", numpy_helper.from_array(np.asarray(thresholds, np.float64))
        )
    )
    graph.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    for opset in graph.opset_import:
        if opset.domain == "ai.onnx.ml":
            opset.version = max(opset.version, 3)


def _rename_output(graph) -> str:  # onnx.ModelProto
    old = graph.graph.output[0].name
    for node in graph.graph.node:
        node.output[:] = [OUTPUT if name == old else name for name in node.output]
    return OUTPUT


def torch_onnx(model: TorchRiskModel) -> bytes:
    """The network as an ONNX graph with a dynamic batch axis (TorchScript-based exporter).

    The dynamo-based exporter needs onnxscript, which Keel does not ship; the TorchScript
    exporter handles this network (embeddings, linear layers, softplus) completely.
    """
    import torch

    if model.precision != "fp32":
        raise ValueError(f"export the FP32 network, not its {model.precision} variant")
    example = (
        torch.zeros((2, model.architecture["free_inputs"]), dtype=torch.float32),
        torch.zeros((2, model.architecture["monotone_inputs"]), dtype=torch.float32),
        torch.from_numpy(np.zeros((2, len(model.architecture["cardinalities"])), dtype=np.int64)),
    )
    axes = {name: {0: "rows"} for name in (*NETWORK_INPUTS, OUTPUT)}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; it still works.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model.network.eval(),
            example,
            buffer,
            input_names=list(NETWORK_INPUTS),
            output_names=[OUTPUT],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def int8_onnx(fp32_graph: bytes, calibration: list[dict[str, np.ndarray]]) -> bytes:
    """The graph with INT8 weights and activations (onnxruntime static quantisation, QDQ).

    Activation ranges are calibrated once on ``calibration`` (batches of graph inputs from the
    validation window), so a row's INT8 score never depends on the rows batched with it, which
    dynamic quantisation (ranges measured per batch) cannot promise. The hidden layers are
    quantised; the output layer is not: eight bits over the whole logit range would move
    scores by up to a percentage point, several times what the hidden layers cost.
    """
    import logging

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    layers = [n.name for n in onnx.load_from_string(fp32_graph).graph.node if n.op_type == "Gemm"]
    output_layer = layers[-1]
    with tempfile.TemporaryDirectory(prefix="keel-int8-") as scratch:
        source, target = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        source.write_bytes(fp32_graph)
        # onnxruntime logs a pre-processing hint on the root logger; the exporter's graph is
        # already shape-inferred.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_static(
                source,
                target,
                Batches(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["Gemm"],
                nodes_to_exclude=[output_layer],
                calibrate_method=CalibrationMethod.MinMax,
            )
        finally:
            root.setLevel(level)
        return target.read_bytes()


def calibration_batches(
    model: TorchRiskModel, frame: pd.DataFrame, rows: int = CALIBRATION_ROWS
) -> list[dict[str, np.ndarray]]:
    """Graph inputs for INT8 calibration: up to ``rows`` rows of ``frame``, in batches."""
    if len(frame) > rows:
        frame = frame.sample(rows, random_state=0)
    free, monotone, codes = model.encoder.network_arrays(frame)
    return [
        dict(
            zip(
                NETWORK_INPUTS,
                (free[i : i + 512], monotone[i : i + 512], codes[i : i + 512]),
                strict=True,
            )
        )
        for i in range(0, len(free), 512)
    ]


def onnx_graph(model: RiskModel) -> bytes:
    """The FP32 ONNX graph of either family."""
    if model.family == "lightgbm":
        return lightgbm_onnx(model)
    return torch_onnx(model)
