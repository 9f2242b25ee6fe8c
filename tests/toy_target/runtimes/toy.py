"""The toy target's runtime: TorchScript components run by `torch.jit` on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from instaflow_edge.errors import UserError
from instaflow_edge.manifest import Manifest
from instaflow_edge.runtimes.base import BundleSession, Runtime, RuntimeOptions, Session


class ToySession(BundleSession):
    runtime = "toy"
    executed_on = "torch.jit (CPU)"

    def __init__(self, bundle: Path, manifest: Manifest, options: RuntimeOptions):
        self.attach_bundle(bundle, manifest, options)
        self.load_graphs()

    def load_graph(self, component: str, path: Path):
        return torch.jit.load(str(path)).float().eval()

    def infer(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        with torch.no_grad():
            out = self.graph(component)(*(torch.from_numpy(inputs[t.name]) for t in spec.inputs))
        return {spec.outputs[0].name: out.numpy()}

    def graph_tensors(self, component: str, graph) -> None:
        return None  # TorchScript keeps no tensor signature


class ToyRuntime(Runtime):
    name = "toy"
    target = "toy"

    def open(
        self, bundle: Path, manifest: Manifest, device: str, options: RuntimeOptions
    ) -> Session:
        if device != "cpu":
            raise UserError(f"unknown device {device!r} for the toy runtime: use cpu")
        return ToySession(bundle, manifest, options)
