"""Where a model comes from: the embedded default, a preset, a local diffusers directory, or a hub id."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

from instaflow_edge.diffusers_format import flip_prediction, speaks_flow_prediction
from instaflow_edge.errors import UserError
from instaflow_edge.presets import PRESETS, build_modules

EMBEDDED_MODEL_DIR = Path(__file__).parent / "embedded" / "tiny"
DEFAULT_MODEL = "tiny"
COMPONENT_FOLDERS = ("text_encoder", "tokenizer", "unet", "vae")
# what a text-to-image repository on the hub holds that we load (safetensors only)
HUB_FILES = [
    "model_index.json",
    "scheduler/*.json",  # ours says which way the UNet's output points
    *(
        f"{folder}/{pattern}"
        for folder in COMPONENT_FOLDERS
        for pattern in ("*.json", "*.txt", "*.safetensors")
    ),
]
HUB_PROBE_SECONDS = 10
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """The four parts of a one-step text-to-image model and the name of where they came from."""

    tokenizer: PreTrainedTokenizerBase
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    source: str

    def eval(self) -> LoadedModel:
        for module in (self.text_encoder, self.unet, self.vae):
            module.eval()
        return self


def load_model(model: str | Path | None = None) -> LoadedModel:
    """Load `model`: None or "tiny" (embedded default), "sd15" (random weights), a directory, or a hub id."""
    name = DEFAULT_MODEL if model is None else str(model)
    name = name.removeprefix("embedded:").removeprefix("preset:")  # sources are loadable names
    if name == "tiny":
        return _load_directory(EMBEDDED_MODEL_DIR, source="embedded:tiny")
    if name in PRESETS:
        modules = build_modules(name)
        tokenizer = CLIPTokenizer.from_pretrained(
            EMBEDDED_MODEL_DIR / "tokenizer",
            model_max_length=PRESETS[name]["text_encoder"]["max_position_embeddings"],
        )
        return LoadedModel(tokenizer=tokenizer, source=f"preset:{name}", **modules)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_directory(path, source=str(path.resolve()))
    if path.exists():
        raise UserError(f"model {name!r} is a file; expected a diffusers model directory")
    if _HUB_ID.match(name) and not name.startswith((".", "~")) and not path.parent.is_dir():
        return _load_hub(name)
    if path.parent.is_dir() and path.parent != Path("."):  # a local folder, mistyped: not a hub id
        raise UserError(
            f"model directory {name!r} not found (its folder {path.parent} exists: a local path, "
            "not a hub id)"
        )
    raise UserError(
        f"model {name!r} not found: give a diffusers model directory, a hub id, "
        f"or one of the presets ({', '.join(PRESETS)})"
    )


def _load_directory(path: Path, source: str) -> LoadedModel:
    missing = [folder for folder in COMPONENT_FOLDERS if not (path / folder).is_dir()]
    if missing:
        raise UserError(
            f"{path} is not a diffusers text-to-image model: missing {', '.join(missing)}/"
        )
    for folder in ("text_encoder", "unet", "vae"):
        _check_safetensors(path / folder)
    try:
        loaded = LoadedModel(
            tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
            text_encoder=_complete(CLIPTextModel, path / "text_encoder"),
            unet=_complete(UNet2DConditionModel, path / "unet"),
            vae=_complete(AutoencoderKL, path / "vae"),
            source=source,
        ).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise UserError(f"could not load the model in {path}: {_first_line(error)}") from error
    if speaks_flow_prediction(path):  # saved for diffusers: back to InstaFlow's velocity
        flip_prediction(loaded.unet)
    return loaded


def _complete(model_class, folder: Path | str, **where: str):
    """A module from a folder's safetensors (a hub id's with `subfolder`), refused unless every
    weight came from the file (the libraries would fill a missing tensor with fresh random
    values, or leave it empty)."""
    module, info = model_class.from_pretrained(
        folder, use_safetensors=True, output_loading_info=True, **where
    )
    folder = "/".join([str(folder), *where.values()])
    wrong = {
        kind: sorted(info.get(kind) or [])
        for kind in ("missing_keys", "mismatched_keys", "error_msgs")
    }
    for kind, names in wrong.items():
        if names:
            what = kind.replace("_keys", "").replace("error_msgs", "errors")
            raise UserError(
                f"the weights in {folder} do not fit its config: {len(names)} {what} "
                f"tensor(s), e.g. {names[0]}"
            )
    return module


def _load_hub(model_id: str) -> LoadedModel:
    """A hub model: from the local cache when it is there (no network), else downloaded after
    one quick probe of the hub, so that a machine offline fails in seconds, not minutes of
    retries; then loaded and checked as any local directory."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = {"allow_patterns": HUB_FILES, "ignore_patterns": ["*.fp16.*", "*.non_ema.*"]}
    try:
        folder = huggingface_hub.snapshot_download(model_id, local_files_only=True, **patterns)
    except LocalEntryNotFoundError:
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            raise UserError(
                f"model {model_id!r} is not in the local hub cache and HF_HUB_OFFLINE is set"
            ) from None
        try:
            huggingface_hub.model_info(model_id, timeout=HUB_PROBE_SECONDS)
            folder = huggingface_hub.snapshot_download(model_id, **patterns)
        except Exception as error:  # the hub client raises many types; all mean "not available"
            raise UserError(
                f"model {model_id!r} is not in the local hub cache and could not be fetched "
                f"from the hub: {_first_line(error)}"
            ) from error
    return _load_directory(Path(folder), source=model_id)


def _check_safetensors(folder: Path) -> None:
    """Refuse pickled weights and name the first safetensors file whose header is corrupt."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in {".bin", ".pt", ".ckpt"})
        detail = (
            f" (found {', '.join(pickled)}; pickled weights are never loaded)" if pickled else ""
        )
        raise UserError(f"no .safetensors weights in {folder}{detail}")
    for file in weights:
        try:
            with safe_open(file, framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            raise UserError(f"corrupt safetensors file {file}: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
