"""Peers from the ecosystem's clients, for `bench --peers`: what a user would run instead of our
bundles, made by the client itself (optimum-onnx's and optimum-intel's own exports of the model,
at their defaults or with optimum-intel's hybrid quantization). Each client pins libraries that fit
neither our venv nor the other's, so each runs in its own venv (clients/build_venvs.sh) as a worker
process (client_worker.py) that the bench calls once per timed call, in the same rounds as the
reference and our bundles."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from instaflow_edge.components import RECIPE, component_specs
from instaflow_edge.errors import UserError
from instaflow_edge.latency import END_TO_END
from instaflow_edge.runtimes.base import RuntimeOptions, RuntimeUnavailable, Session

logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("client_worker.py")
COMPLETE = ".complete"  # client_worker.py writes it last into a finished export
ROOT = Path(__file__).resolve().parent.parent  # the repository, for an editable install
HYBRID_SAMPLES = 64  # UNet calls optimum-intel's hybrid mode calibrates on (its default: 200)


@dataclass(frozen=True)
class ClientPeer:
    client: str  # client_worker.py's CLIENT, and its venv's name under client_venvs()
    hybrid: bool  # optimum-intel's hybrid quantization
    description: str


CLIENT_PEERS = {
    "optimum-onnx": ClientPeer(
        "optimum-onnx",
        False,
        "optimum-onnx's own export (main_export, task text-to-image) run by its "
        "ORTDiffusionPipeline (ONNX Runtime CPU at its defaults)",
    ),
    "optimum-intel": ClientPeer(
        "optimum-intel",
        False,
        "optimum-intel's own export (OVDiffusionPipeline, export=True) at its defaults "
        "(OpenVINO's inference precision: bf16 on a CPU with AVX-512 BF16 or AMX)",
    ),
    "optimum-intel-hybrid": ClientPeer(
        "optimum-intel",
        True,
        "optimum-intel's export with its hybrid quantization (int8 weights in MatMuls, int8 "
        f"activations elsewhere in the UNet), calibrated on {HYBRID_SAMPLES} UNet calls of its "
        "pipeline at one step over our calibration prompts, run at OpenVINO's defaults",
    ),
}


def client_venvs() -> Path:
    """Where the client venvs are: $INSTAFLOW_CLIENT_VENVS, else .client-venvs in the repository."""
    return Path(os.environ.get("INSTAFLOW_CLIENT_VENVS", ROOT / ".client-venvs"))


def client_python(venv: str) -> Path | None:
    python = client_venvs() / venv / "bin" / "python"
    return python if python.is_file() else None


def peer_python(name: str) -> Path:
    """The python of a client peer's venv; a one-line error where it is not built."""
    venv = CLIENT_PEERS[name].client
    python = client_python(venv)
    if python is None:
        raise RuntimeUnavailable(
            f"peer {name} needs the {venv} venv in {client_venvs()} (build it with "
            "clients/build_venvs.sh, or set INSTAFLOW_CLIENT_VENVS)"
        )
    return python


class ClientPeerSession(Session):
    """A client's pipeline in its worker process: components and generation on our inputs."""

    def __init__(
        self,
        name: str,
        process: subprocess.Popen,
        ready: dict[str, Any],
        log: Path,
        reference: Any,
        export: Path,
    ):
        self.runtime = name
        self.process, self.ready, self.log, self.export = process, ready, log, export
        contract = component_specs(reference.pipeline.shapes)
        self._output_names = {part: contract[part].outputs[0].name for part in RECIPE}
        self.executed_on = ready["executed_on"]
        self.options = RuntimeOptions(fused=False)
        self.recipe = reference.recipe
        self._prompts: dict[bytes, str] = {}
        self._keys: dict[tuple, str] = {}
        self._scratch = tempfile.TemporaryDirectory(prefix="instaflow-peer-")
        self._tokenizer = reference.tokenize

    def settings(self) -> dict[str, object]:
        return {k: v for k, v in self.ready.items() if k not in ("ready", "baseline_rss_mib")}

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """The reference's token ids (the same tokenizer files the client reads), remembered so
        that `generate` can hand the client the prompts, which is what its pipeline takes."""
        ids = self._tokenizer(prompts)
        for row, prompt in zip(ids, prompts, strict=True):
            self._prompts[row.tobytes()] = prompt
        return ids

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self._output_names[component]: self._output(self._feed(component, feeds))}

    def prepare(self, component: str, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        key = self._feed(component, feeds)
        return lambda: self._request({"op": "run", "key": key})

    def generate(self, input_ids: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return self._output(self._generation(input_ids, noise))

    def prepare_generate(self, input_ids: np.ndarray, noise: np.ndarray) -> Callable[[], object]:
        key = self._generation(input_ids, noise)
        return lambda: self._request({"op": "run", "key": key})

    def _generation(self, input_ids: np.ndarray, noise: np.ndarray) -> str:
        try:
            prompts = [self._prompts[row.tobytes()] for row in np.asarray(input_ids, np.int64)]
        except KeyError:
            raise UserError(f"peer {self.runtime}: token ids it was not given as prompts") from None
        return self._feed(END_TO_END, {"noise": noise.astype(np.float32)}, prompts)

    def _feed(self, part: str, arrays: dict[str, np.ndarray], prompts: list[str] = ()) -> str:
        """Send `part`'s inputs to the worker once; the key it keeps them under."""
        identity = (part, tuple(prompts), *((n, a.shape, a.tobytes()) for n, a in arrays.items()))
        if identity not in self._keys:
            key = str(len(self._keys))
            path = Path(self._scratch.name) / f"{key}.npz"
            np.savez(path, **{name: np.ascontiguousarray(a) for name, a in arrays.items()})
            request = {"op": "feed", "key": key, "part": part, "arrays": str(path)}
            self._request({**request, "prompts": list(prompts)})
            self._keys[identity] = key
        return self._keys[identity]

    def _output(self, key: str) -> np.ndarray:
        path = Path(self._scratch.name) / f"{key}.out.npy"
        self._request({"op": "output", "key": key, "path": str(path)})
        return np.load(path)

    def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = _reply(self.process, self.runtime, self.log)
        if "error" in reply:
            raise RuntimeUnavailable(f"peer {self.runtime}: {reply['error']} (log: {self.log})")
        return reply

    def peak_rss_mib(self) -> float | None:
        """The worker's peak resident memory since it loaded, above what it held before."""
        from instaflow_edge.memory import status_mib

        peak = status_mib("VmHWM", self.process.pid)
        baseline = self.ready.get("baseline_rss_mib")
        return None if peak is None or baseline is None else peak - baseline

    def sizes(self) -> dict[str, float]:
        """MiB on disk of each component of the client's export (its folders are named as our
        components), and of the three (end to end)."""
        sizes = {
            part: sum(f.stat().st_size for f in (self.export / part).rglob("*") if f.is_file())
            / 2**20
            for part in RECIPE
        }
        return {**sizes, END_TO_END: sum(sizes.values())}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self._scratch.cleanup()


def _reply(process: subprocess.Popen, name: str, log: Path) -> dict[str, Any]:
    line = process.stdout.readline()
    if not line:
        process.wait()
        raise RuntimeUnavailable(
            f"peer {name} stopped (exit status {process.returncode}): {_tail(log)}"
        )
    return json.loads(line)


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()[-3:]
    return f"{' | '.join(lines)} (log: {log})"


def worker_env() -> dict[str, str]:
    """A worker's environment: offline (the model is a local folder), its output unbuffered."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def export_command(name: str, model: Path, export: Path, prompts: Path | None = None) -> list[str]:
    """The command with which peer `name`'s worker makes the client's export of the diffusers
    folder `model` into `export`; a hybrid peer calibrates on the JSON list of `prompts`."""
    peer = CLIENT_PEERS[name]
    command = [str(peer_python(name)), str(WORKER), "export", peer.client, str(model), str(export)]
    if peer.hybrid:
        command += ["--hybrid", str(prompts), "--num-samples", str(HYBRID_SAMPLES)]
    return command


def open_client_peer(
    name: str, reference: Any, folder: Path, calibration_prompts: list[str]
) -> ClientPeerSession:
    """Start `name`'s worker on the model of `reference` (the PyTorch reference session), saved
    as a diffusers folder in `folder` (the bench's cache for these weights), the client's export
    made there once; returns it loaded."""
    peer = CLIENT_PEERS[name]
    python = peer_python(name)  # the client's venv
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model"
    if not (model / "model_index.json").is_file():
        reference.pipeline.save_pretrained(model, overwrite=True)
    export = folder / f"peer-{name}"
    log = folder / f"peer-{name}.log"
    env = worker_env()
    made = None
    if not (export / COMPLETE).is_file():
        prompts = None
        if peer.hybrid:
            prompts = folder / "peer-calibration-prompts.json"
            prompts.write_text(json.dumps(calibration_prompts))
        command = export_command(name, model, export, prompts)
        logger.info("peer %s: the client exports the model into %s (log: %s)", name, export, log)
        started = time.perf_counter()
        with open(log, "w") as stderr:
            done = subprocess.run(command, stdout=stderr, stderr=stderr, env=env)
        if done.returncode != 0:
            raise RuntimeUnavailable(f"peer {name}: the client's export failed: {_tail(log)}")
        made = round(time.perf_counter() - started, 1)
    with open(log, "a") as stderr:
        process = subprocess.Popen(
            [str(python), str(WORKER), "serve", peer.client, str(export)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
    ready = {**_reply(process, name, log), "export_seconds": made}  # None: made before
    return ClientPeerSession(name, process, ready, log, reference, export)
