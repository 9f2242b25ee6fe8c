"""A client peer's process: an ecosystem client's own export of a model, run as its users run it,
call by call on the bench's inputs. Runs in the client's venv (numpy, torch and the client only:
it never imports instaflow_edge, which is not installed there).

    python client_worker.py export CLIENT MODEL EXPORT [--hybrid PROMPTS.json --num-samples N]
    python client_worker.py serve CLIENT EXPORT

CLIENT is optimum-onnx (`main_export`, task text-to-image; `ORTDiffusionPipeline`) or optimum-intel
(`OVDiffusionPipeline.from_pretrained(export=True)`, with `--hybrid` its hybrid quantization
calibrated on those prompts). `export` writes MODEL, a diffusers folder, into EXPORT (a staging
folder renamed when complete). `serve` loads EXPORT at the client's defaults, prints one JSON line
(`ready`, with what it loaded), then answers JSON-line requests on stdin with one JSON line each
on stdout (library chatter goes to stderr):

    {"op": "feed", "key": K, "part": P, "arrays": NPZ, "prompts": [...]}   keep P's inputs as K
    {"op": "output", "key": K, "path": NPY}   run K once and save its output there
    {"op": "run", "key": K}                   run K once (what the bench times)

Parts: text_encoder, unet, vae_decoder (fed our component inputs by name) and end_to_end (prompts
and noise: the client's pipeline, one step, no guidance, our noise as `latents=`, to uint8 NHWC).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import shutil
import sys
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

COMPLETE = ".complete"  # written last into a finished export
CLIENT_MODULES = {"optimum-onnx": "optimum.onnxruntime", "optimum-intel": "optimum.intel"}


def resident_mib(field: str) -> float | None:
    """A memory field of this process's /proc status, in MiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return None


def export(client: str, model: str, out: Path, hybrid: list[str] | None, samples: int) -> None:
    if client == "optimum-onnx":
        from optimum.exporters.onnx import main_export

        main_export(model, out, task="text-to-image")
        return
    from optimum.intel import OVDiffusionPipeline, OVWeightQuantizationConfig

    config = None
    if hybrid is not None:
        config = OVWeightQuantizationConfig(
            bits=8, quant_method="hybrid", dataset=hybrid, num_samples=samples
        )
        # its calibration runs the pipeline at the pipeline's defaults, 50 steps with guidance,
        # which is not where a one-step model runs: calibrate at one step at t = 1000 without
        # guidance instead
        generate = OVDiffusionPipeline.__call__
        OVDiffusionPipeline.__call__ = functools.partialmethod(
            generate, num_inference_steps=1, guidance_scale=0.0
        )
    pipe = OVDiffusionPipeline.from_pretrained(model, export=True, quantization_config=config)
    pipe.save_pretrained(out)


def load(client: str, folder: Path) -> Any:
    if client == "optimum-onnx":
        from optimum.onnxruntime import ORTDiffusionPipeline

        return ORTDiffusionPipeline.from_pretrained(folder)
    from optimum.intel import OVDiffusionPipeline

    return OVDiffusionPipeline.from_pretrained(folder)  # OpenVINO's own defaults


def runtime_info(client: str, pipe: Any) -> dict[str, Any]:
    """What runs the peer: the runtime, its version and its settings as loaded."""
    if client == "optimum-onnx":
        import onnxruntime

        providers = pipe.unet.session.get_providers()
        return {
            "runtime": "onnxruntime",
            "runtime_version": onnxruntime.__version__,
            "executed_on": providers[0],
            "providers": providers,
        }
    import openvino

    compiled = pipe.unet.request  # optimum-intel keeps the CompiledModel there
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # e.g. bf16
    devices = ",".join(compiled.get_property("EXECUTION_DEVICES"))
    return {
        "runtime": "openvino",
        "runtime_version": openvino.__version__,
        "executed_on": f"{devices} {precision}",  # as our OpenVINO sessions say it
        "inference_precision": precision,
        "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
    }


def make_call(pipe: Any, part: str, arrays: dict[str, np.ndarray], prompts: list[str]):
    """The call of `part` on these inputs, returning its output as a numpy array."""
    import torch

    tensors = {name: torch.from_numpy(value) for name, value in arrays.items()}
    if part == "end_to_end":

        def generate() -> np.ndarray:
            images = pipe(
                prompts,
                latents=tensors["noise"],
                num_inference_steps=1,
                guidance_scale=0.0,
                output_type="np",
            ).images
            return (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8)

        return generate
    if part == "unet":
        steps = arrays["timestep"]
        if not np.all(steps == steps.flat[0]):
            raise ValueError("the clients' UNets take one timestep for the batch")
        tensors["timestep"] = tensors["timestep"].flatten()[0]  # as their pipelines pass it
    model = {"text_encoder": pipe.text_encoder, "unet": pipe.unet, "vae_decoder": pipe.vae_decoder}
    # the first output: last_hidden_state, the UNet's prediction (optimum-intel names it
    # out_sample, optimum-onnx sample), the decoded sample
    return lambda: np.asarray(model[part](**tensors)[0])


def serve(pipe: Any, requests, replies) -> None:
    calls = {}
    for line in requests:
        request = json.loads(line)
        try:
            if request["op"] == "feed":
                with np.load(request["arrays"]) as arrays:
                    feeds = {name: arrays[name] for name in arrays.files}
                calls[request["key"]] = make_call(
                    pipe, request["part"], feeds, request.get("prompts", [])
                )
            elif request["op"] == "output":
                np.save(request["path"], calls[request["key"]]())
            elif request["op"] == "run":
                calls[request["key"]]()
            else:
                raise ValueError(f"unknown op {request['op']!r}")
            reply = {"ok": True}
        except Exception as error:  # the bench reports it in one line and stops the peer
            traceback.print_exc()
            reply = {"error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    made = commands.add_parser("export", help="export MODEL into EXPORT with the client")
    made.add_argument("client", choices=sorted(CLIENT_MODULES))
    made.add_argument("model")
    made.add_argument("export", type=Path)
    made.add_argument("--hybrid", type=Path, help="JSON list of calibration prompts")
    made.add_argument("--num-samples", type=int, default=200)
    served = commands.add_parser("serve", help="load EXPORT and answer requests")
    served.add_argument("client", choices=sorted(CLIENT_MODULES))
    served.add_argument("export", type=Path)
    args = parser.parse_args()

    if args.command == "export":
        staging = args.export.with_name(args.export.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        prompts = json.loads(args.hybrid.read_text()) if args.hybrid else None
        export(args.client, args.model, staging, prompts, args.num_samples)
        (staging / COMPLETE).write_text("")
        shutil.rmtree(args.export, ignore_errors=True)
        staging.rename(args.export)
        return 0
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # the protocol's own stdout
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # every library's prints go to stderr
    importlib.import_module(CLIENT_MODULES[args.client])
    baseline = resident_mib("VmRSS")  # the interpreter and the client, before the model
    pipe = load(args.client, args.export)
    ready = {
        "ready": True,
        "pipeline": type(pipe).__name__,
        "client_version": version(args.client),  # CLIENT is its package's name
        "baseline_rss_mib": baseline,
        **runtime_info(args.client, pipe),
    }
    replies.write(json.dumps(ready) + "\n")
    replies.flush()
    serve(pipe, sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
