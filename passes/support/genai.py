"""onnxruntime-genai folders: a decoder model beside genai_config.json and tokenizer files.

genai_config.json names the KV-cache tensors with printf templates (decoder.inputs.past_key_names =
"past_key_values.%d.key", outputs.present_key_names = "present.%d.key", ...) over decoder.num_hidden_layers
caches. After attention is removed from some layers, the caches that remain are renumbered 0..n-1 in layer order
(the graph's inputs and outputs renamed accordingly) and num_hidden_layers becomes n, so the runtime allocates
exactly the caches the graph has. A pass that writes its output into another folder writes the updated config
there (decoder.filename = the output's file name) and copies the folder's other small files (tokenizer, chat
template, processor config), so the output folder runs as it is.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import onnx

from passes.support.errors import fail

CONFIG = "genai_config.json"
CACHE_TEMPLATES = (("inputs", "past_key_names"), ("inputs", "past_value_names"),
                   ("outputs", "present_key_names"), ("outputs", "present_value_names"))
SIDE_FILE_LIMIT = 256 << 20       # tokenizer and template files; anything larger is not a side file


@dataclass
class GenaiFolder:
    folder: Path
    config: dict

    @property
    def decoder(self) -> dict:
        return self.config["model"]["decoder"]

    def templates(self) -> list[str]:
        return [self.decoder.get(part, {}).get(key) for part, key in CACHE_TEMPLATES
                if isinstance(self.decoder.get(part, {}).get(key), str) and "%d" in self.decoder[part][key]]


def genai_folder(model_path: Path) -> GenaiFolder | None:
    """The genai config beside `model_path` when it describes that file, else None."""
    path = Path(model_path).parent / CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        decoder = config["model"]["decoder"]
    except (ValueError, KeyError, TypeError) as exc:
        fail(f"{path}: not a readable onnxruntime-genai config ({type(exc).__name__}: {exc})")
    if decoder.get("filename") != Path(model_path).name:
        return None
    return GenaiFolder(path.parent, config)


def renumber_caches(proto: onnx.ModelProto, folder: GenaiFolder) -> int:
    """Rename the KV-cache inputs/outputs that remain to consecutive numbers (in layer order), in place; returns
    how many caches there are."""
    patterns = [re.compile("^" + re.escape(t).replace("%d", r"(\d+)") + "$") for t in folder.templates()]
    names = [v.name for v in (*proto.graph.input, *proto.graph.output)]
    layers = sorted({int(m.group(1)) for p in patterns for n in names if (m := p.match(n))})
    order = {layer: j for j, layer in enumerate(layers)}
    mapping = {}
    for template, pattern in zip(folder.templates(), patterns):
        for name in names:
            found = pattern.match(name)
            if found:
                mapping[name] = template.replace("%d", str(order[int(found.group(1))]))
    if any(old != new for old, new in mapping.items()):
        _rename(proto.graph, mapping)
    return len(layers)


def _rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = mapping.get(value.name, value.name)
    for node in graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = mapping.get(name, name)
        for k, name in enumerate(node.output):
            node.output[k] = mapping.get(name, name)


def side_files(folder: GenaiFolder, output_name: str, caches: int | None, skip: set[Path]) -> dict[str, bytes | Path]:
    """Files that make the output's folder a genai folder: the updated config and the other small regular files
    of the input folder (not models, not their data, nothing in `skip`, no symbolic links)."""
    config = copy.deepcopy(folder.config)
    config["model"]["decoder"]["filename"] = output_name
    if caches is not None and folder.templates():
        config["model"]["decoder"]["num_hidden_layers"] = caches
    files: dict[str, bytes | Path] = {CONFIG: (json.dumps(config, indent=4) + "\n").encode()}
    skipped = {p.resolve() for p in skip}
    for path in sorted(folder.folder.iterdir()):
        if path.name == CONFIG or path.is_symlink() or not path.is_file() or path.resolve() in skipped:
            continue
        if path.suffix in (".onnx", ".data") or path.name.endswith((".onnx.data", ".onnx_data")):
            continue
        if path.stat().st_size <= SIDE_FILE_LIMIT:
            files[path.name] = path
    return files


def beside_output(model, proto: onnx.ModelProto, out_path: Path, renumber: bool) -> tuple[dict[str, bytes | Path] | None, str | None]:
    """For a pass writing `proto` (made from the LoadedModel `model`) to out_path: when the input is in an
    onnxruntime-genai folder, renumber the remaining KV caches in place (with `renumber`) and return the files to
    write beside the output (None when the output is in the input's own folder, whose config must not change,
    with a note saying so); (None, None) for any other model."""
    folder = genai_folder(model.path)
    if folder is None:
        return None, None
    caches = renumber_caches(proto, folder) if renumber else None
    if Path(out_path).resolve().parent == folder.folder.resolve():
        return None, ("genai_config.json not written: the output is in the input's folder; write to another folder "
                      "(-o NEW_DIR/model.onnx) for a folder onnxruntime-genai runs as it is")
    return side_files(folder, Path(out_path).name, caches, skip={model.path, *model.external_files}), None
