"""ONNX written by other people's tools, the forms users bring: a transformers LlamaForCausalLM exported by
torch.onnx (TorchScript, dynamo), the dynamo export after onnxruntime's transformer optimizer, and the folder
onnxruntime-genai's model builder writes. For tests and studies of the passes on graphs we did not write.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

FORMS = ("torchscript", "dynamo", "ortopt", "genai")


class _Logits(torch.nn.Module):
    def __init__(self, model, with_mask: bool):
        super().__init__()
        self.model, self.with_mask = model, with_mask

    def forward(self, ids, mask=None):
        return self.model(input_ids=ids, attention_mask=mask if self.with_mask else None, use_cache=False).logits


def export_forms(model, tokenizer, folder: Path, forms=FORMS) -> dict[str, Path]:
    """`forms` of a transformers LlamaForCausalLM (eager attention, float32) under `folder`: form -> model path.
    Models above 1 GB of weights are written with external data. The HF folder (model and tokenizer, which
    onnxruntime-genai's builder reads) is folder/hf. ortopt needs dynamo."""
    import warnings
    folder = Path(folder)
    hf = folder / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > 1e9
    ids = torch.zeros(2, 8, dtype=torch.int64)
    paths = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "torchscript" in forms:   # transformers' mask code needs an explicit attention mask to trace
            paths["torchscript"] = folder / "torchscript.onnx"
            torch.onnx.export(_Logits(model, True), (ids, torch.ones_like(ids)), str(paths["torchscript"]), dynamo=False,
                              opset_version=17, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                            "logits": {0: "batch", 1: "seq"}})
        if "dynamo" in forms or "ortopt" in forms:
            paths["dynamo"] = folder / "dynamo.onnx"
            program = torch.onnx.export(_Logits(model, False), (ids,), dynamo=True, input_names=["input_ids"],
                                        output_names=["logits"], verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},))
            program.save(str(paths["dynamo"]), external_data=external)
    if "ortopt" in forms:
        from onnxruntime.transformers.optimizer import optimize_model
        paths["ortopt"] = folder / "ortopt.onnx"
        config = model.config
        optimize_model(str(paths["dynamo"]), model_type="gpt2", num_heads=config.num_attention_heads,
                       hidden_size=config.hidden_size, opt_level=0).save_model_to_file(
            str(paths["ortopt"]), use_external_data_format=external)
    if "genai" in forms:
        genai = folder / "genai"
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(genai),
                        "-p", "fp32", "-e", "cpu"], check=True, capture_output=True, timeout=900)
        paths["genai"] = genai / "model.onnx"
    return {form: paths[form] for form in forms}
