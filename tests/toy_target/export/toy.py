"""A fourth target written for the contract suite: TorchScript files, run by `torch.jit`.

It shows what adding a target takes: this exporter module and one runtime module
(`tests/toy_target/runtimes/toy.py`), nothing else. fp16 stores the weights in half precision
(the runtime computes in float32, as an fp16-weights IR does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from instaflow_edge.components import COMPONENTS
from instaflow_edge.export.base import Conversion, Exporter, Quantization


class ToyExporter(Exporter):
    target = "toy"
    runtime = "toy"
    layout = {name: f"{name}/model.pt" for name in COMPONENTS}
    converter = "torch.jit.trace"
    methods = ("fp16",)
    quantizes_from = ("fp32",)
    method_precisions = {"fp16": "fp16"}

    def convert(self, job: Conversion) -> Any:
        inputs = tuple(torch.from_numpy(job.example[t.name]) for t in job.spec.inputs)
        with torch.no_grad():
            return torch.jit.trace(job.module, inputs, check_trace=False)

    def save(self, model: Any, path: Path, job: Conversion) -> None:
        torch.jit.save(model, str(path))  # shares the pipeline's weights: halve a loaded copy
        if job.precision == "fp16":
            torch.jit.save(torch.jit.load(str(path)).half(), str(path))

    def quantize_component(self, job: Quantization) -> bool:
        torch.jit.save(torch.jit.load(str(job.source)).half(), str(job.dest))
        return True
