"""bench.serving without vLLM (vLLM itself runs on the GPU machine: bench/gpu_suite.sh vllm-*): which folders it lets
vLLM run configuration code from, and the torch side of its token check against a greedy loop written here (one
position at a time, log-probabilities read off each step), with a planted divergence it must find."""
from __future__ import annotations

import shutil

import pytest
import torch

from bench.serving import engine_args, needs_our_code, pydoc_prompts, torch_check
from exporters.export import main as export_main
from models.checkpoint import save_checkpoint
from models.loaders import load_model
from models.presets import build_preset
from passes.support.errors import UserError
from tests.nvidia_folder import write_nvidia_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    nvidia = write_nvidia_folder(tmp / "nvidia")
    ours = tmp / "ours"
    assert export_main([str(nvidia), "-o", str(ours), "--runtime", "nemotron-nas", "--dtype", "fp32"]) == 0
    return nvidia, ours


def test_vllm_runs_only_our_configuration_code(folders, tmp_path):
    nvidia, ours = folders
    assert needs_our_code(ours) and engine_args(ours, "float32", 64, 5, False, False)["trust_remote_code"]
    with pytest.raises(UserError, match="not this project's configuration_decilm.py"):
        needs_our_code(nvidia)                       # auto_map naming code that is not there (NVIDIA's release)
    tampered = tmp_path / "tampered"
    shutil.copytree(ours, tampered)
    (tampered / "configuration_decilm.py").write_text((ours / "configuration_decilm.py").read_text() + "\nimport os\n")
    with pytest.raises(UserError, match="refusing to run it"):
        needs_our_code(tampered)
    llama = tmp_path / "llama"
    save_checkpoint(build_preset("llama-tiny", torch.float32)[0], llama)      # uniform layers: a plain llama folder
    assert not needs_our_code(llama) and not engine_args(llama, "bfloat16", 64, 1, True, False)["trust_remote_code"]


def _greedy_with_logprobs(model, prompts: list[list[int]], new: int) -> dict:
    """One prompt at a time, one token at a time: argmax of the last position, its log-probability."""
    tokens, logprobs = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids, row_tokens, row_logprobs = list(prompt), [], []
            for _ in range(new):
                last = torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), dim=-1)
                token = int(last.argmax())
                ids.append(token)
                row_tokens.append(token)
                row_logprobs.append(float(last[token]))
            tokens.append(row_tokens)
            logprobs.append(row_logprobs)
    return {"tokens": tokens, "logprobs": logprobs}


def test_torch_check_agrees_with_a_greedy_loop_and_finds_a_planted_divergence(folders):
    _, ours = folders
    prompts = pydoc_prompts(ours, 3, 12)
    assert len(prompts) == 3 and {len(p) for p in prompts} == {12} and prompts[0] != prompts[1]
    served = _greedy_with_logprobs(load_model(str(ours)), prompts, 8)
    check = torch_check(ours, "float32", prompts, served, 8)
    assert check["sequences_identical"] == 3 and check["tokens_equal"] == 1.0
    assert check["top1_agreement_teacher_forced"] == 1.0 and check["first_divergence"] == [None] * 3
    assert check["max_abs_logprob_diff"] < 1e-4

    served["tokens"][1][5] = (served["tokens"][1][5] + 1) % 512          # a server that chose another token at 5
    check = torch_check(ours, "float32", prompts, served, 8)
    assert check["sequences_identical"] == 2 and check["first_divergence"] == [None, 5, None]
    assert check["top1_agreement_teacher_forced"] < 1.0 and check["max_abs_logprob_diff"] > 1e-3
