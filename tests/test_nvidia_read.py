"""Reading NVIDIA's folders (issue 22): a folder shaped like the Llama-3.3-Nemotron-Super release (tests.nvidia_folder:
nemotron-nas, `auto_map` naming code that is not in the folder, llama3 rope scaling, eos [2, 3], bf16) goes through
every command that reads a tokenizer or config, with standard input a pipe that never answers: no prompt, no remote
code, exit 0. The tokenizer encodes as the tokenizers library reads tokenizer.json; genai_config.json keeps every eos
id and onnxruntime-genai stops on each; corrupt tokenizer files are one line and exit 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporters.genai import special_token_ids
from models.loaders import load_tokenizer
from models.text import pydoc_text
from passes.support.errors import UserError
from tests.nvidia_folder import BOS, EOS, write_nvidia_folder

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300
PROMPTS = ("custom code", "trust_remote_code", "[y/N]")


@pytest.fixture(scope="module")
def nvidia(tmp_path_factory) -> Path:
    return write_nvidia_folder(tmp_path_factory.mktemp("nvidia") / "Llama-3_3-Nemotron-Super-tiny")


def run_cli(*args) -> subprocess.CompletedProcess:
    """`python -m ARGS` with standard input a pipe nobody writes to or closes: a prompt would hang until TIMEOUT."""
    read, write = os.pipe()
    try:
        return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=REPO, stdin=read, capture_output=True,
                              text=True, timeout=TIMEOUT)
    finally:
        os.close(read)
        os.close(write)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not any(p in output for p in PROMPTS), output
    assert "Traceback" not in output, output


def assert_one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def reference_ids(folder: Path, text: str, special: bool = False) -> list[int]:
    """The independent reading: the tokenizers library on tokenizer.json."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=special).ids


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def vocab_files_folder(source: Path, target: Path, tokenizer_config: dict) -> Path:
    """The folder with its tokenizer as vocab.json + merges.txt (no tokenizer.json) and the given tokenizer_config."""
    folder = copy_folder(source, target)
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


# ------------------------------------------------------------------ the tokenizer itself


def test_tokenizer_encodes_as_tokenizer_json(nvidia):
    tokenizer = load_tokenizer(str(nvidia))
    text = pydoc_text()[:50_000]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference_ids(nvidia, text)
    assert tokenizer(text[:2000])["input_ids"] == reference_ids(nvidia, text[:2000], special=True)
    assert tokenizer.decode(reference_ids(nvidia, text[:2000])) == text[:2000]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert tokenizer.model_token_ids == {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": None}


CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def release_tokenizer_config(folder: Path) -> None:
    """tokenizer_config.json / special_tokens_map.json as a transformers-4 release writes them (NVIDIA's): the
    PreTrainedTokenizerFast class, added_tokens_decoder, a chat template, a finite model_max_length."""
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in enumerate(("<unk>", "<s>", "</s>"))}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added, "bos_token": "<s>", "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True, "eos_token": "</s>", "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}}))


def test_release_tokenizer_config(nvidia, tmp_path):
    folder = copy_folder(nvidia, tmp_path / "f")
    release_tokenizer_config(folder)
    tokenizer = load_tokenizer(str(folder))
    text = pydoc_text()[:5000]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference_ids(nvidia, text)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.model_max_length) == (BOS, EOS[0], 131072)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<s>user: hi</s>"


def test_generation_config_overrides_config(nvidia, tmp_path):
    folder = copy_folder(nvidia, tmp_path / "f")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [3, 2, 4]}))
    assert load_tokenizer(str(folder)).model_token_ids["eos_token_id"] == [3, 2, 4]


def test_auto_map_in_tokenizer_config_is_ignored_and_not_written(nvidia, tmp_path):
    """A tokenizer_config.json naming a custom tokenizer class (code not in the folder): tokenizer.json is read as
    it is, the written tokenizer files name no code."""
    folder = copy_folder(nvidia, tmp_path / "f")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["tokenization_decilm.DeciLMTokenizer", None]},
                  tokenizer_class="DeciLMTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(folder))
    text = pydoc_text()[:5000]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference_ids(nvidia, text)
    tokenizer.save_pretrained(tmp_path / "saved")
    assert "auto_map" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())


def test_folder_without_tokenizer_json_uses_the_named_transformers_class(nvidia, tmp_path):
    """vocab.json + merges.txt, tokenizer_class GPT2Tokenizer and an auto_map: the transformers class, same ids;
    config.json's auto_map (nemotron-nas) is never read through transformers."""
    folder = vocab_files_folder(nvidia, tmp_path / "f", {
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "auto_map": {"AutoTokenizer": ["tokenization_decilm.DeciLMTokenizer", None]}})
    tokenizer = load_tokenizer(str(folder))
    text = pydoc_text()[:5000]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference_ids(nvidia, text)
    assert tokenizer.model_token_ids["eos_token_id"] == EOS


def test_unknown_tokenizer_class_without_tokenizer_json_is_refused(nvidia, tmp_path):
    folder = vocab_files_folder(nvidia, tmp_path / "f", {
        "tokenizer_class": "DeciLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_decilm.DeciLMTokenizer", None]}})
    with pytest.raises(UserError, match="not a transformers class"):
        load_tokenizer(str(folder))


def test_special_token_ids_as_the_builder_resolves_them(nvidia):
    class Tok:       # a tokenizer whose end-of-turn token (eos_token_id 9) is not among the model's eos ids
        bos_token_id, eos_token_id, pad_token_id = 1, 9, None
        model_token_ids = {"bos_token_id": 5, "eos_token_id": [2, 3], "pad_token_id": None}
    assert special_token_ids(Tok()) == (5, [9, 2, 3], 9)
    Tok.model_token_ids = {"bos_token_id": None, "eos_token_id": 9, "pad_token_id": 0}
    assert special_token_ids(Tok()) == (1, 9, 0)
    assert special_token_ids(None) == (1, 2, 2)
    assert special_token_ids(load_tokenizer(str(nvidia))) == (BOS, EOS, EOS[0])


# ------------------------------------------------------------------ every command, no prompt


def test_bench_inputs(nvidia, tmp_path):
    out = tmp_path / "calib.npz"
    assert_ok(run_cli("bench.inputs", "--text", "@pydoc", "--tokenizer", nvidia, "-o", out, "--rows", "4",
                      "--seq", "128"))
    rows = np.load(out)["input_ids"]
    assert rows.shape == (4, 128)
    assert rows.reshape(-1).tolist() == reference_ids(nvidia, pydoc_text())[:4 * 128]


def test_export_onnx(nvidia, tmp_path):
    assert_ok(run_cli("exporters.export", nvidia, "-o", tmp_path / "m.onnx"))
    assert (tmp_path / "m.onnx").is_file()


def test_export_nemotron_nas(nvidia, tmp_path):
    assert_ok(run_cli("exporters.export", nvidia, "-o", tmp_path / "nas", "--runtime", "nemotron-nas"))
    saved = json.loads((tmp_path / "nas" / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved
    text = pydoc_text()[:5000]
    assert load_tokenizer(str(tmp_path / "nas"))(text, add_special_tokens=False)["input_ids"] == \
        reference_ids(nvidia, text)


def test_export_genai_keeps_every_eos(nvidia, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "genai"
    assert_ok(run_cli("exporters.export", nvidia, "-o", out, "--runtime", "genai", "--provider", "cpu",
                      "--dtype", "fp32"))
    model = json.loads((out / "genai_config.json").read_text())["model"]
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (BOS, EOS, EOS[0])
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())

    def generate(folder: Path, prompt: list[int], new: int) -> list[int]:
        config = og.Config(str(folder))
        config.clear_providers()
        m = og.Model(config)
        params = og.GeneratorParams(m)
        params.set_search_options(max_length=len(prompt) + new, do_sample=False)
        generator = og.Generator(m, params)
        generator.append_tokens(np.asarray([prompt], np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return [int(t) for t in generator.get_sequence(0)][len(prompt):]

    tokenizer = og.Tokenizer(og.Model(og.Config(str(out))))
    prompt = [int(t) for t in tokenizer.encode("def f(x): return x")]
    assert prompt == reference_ids(nvidia, "def f(x): return x")
    free = generate(out, prompt, 6)
    assert len(free) == 6 and not set(free) & set(EOS)
    # genai stops on any id of the list, not only the first (and leaves the eos out of the sequence): make the
    # second greedy token the list's second eos
    stop = copy_folder(out, tmp_path / "stop")
    config = json.loads((stop / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = [EOS[0], free[1]]
    (stop / "genai_config.json").write_text(json.dumps(config))
    assert generate(stop, prompt, 6) == free[:free.index(free[1])]


def test_heal(nvidia, tmp_path):
    out = tmp_path / "healed"
    assert_ok(run_cli("models.heal", nvidia, "-o", out, "--fuse", "1-3", "--steps", "2", "--batch", "2", "--seq", "32",
                      "--pool", "8", "--eval-tokens", "256", "--eval-every", "1", "--save-every", "0", "--device", "cpu"))
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


# ------------------------------------------------------------------ corrupt tokenizer files


def _truncate_tokenizer_json(folder: Path) -> None:
    data = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(data[: len(data) // 3])


def _wrong_model_in_tokenizer_json(folder: Path) -> None:
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": 3}}))


def _binary_tokenizer_config(folder: Path) -> None:
    (folder / "tokenizer_config.json").write_bytes(b"\x00\xff\xfe garbage")


@pytest.mark.parametrize("corrupt, needle", [
    (_truncate_tokenizer_json, "tokenizer.json"),
    (_wrong_model_in_tokenizer_json, "tokenizer.json"),
    (_binary_tokenizer_config, "tokenizer_config.json"),
])
def test_corrupt_tokenizer_exits_2_with_one_line(nvidia, tmp_path, corrupt, needle):
    folder = copy_folder(nvidia, tmp_path / "bad")
    corrupt(folder)
    result = run_cli("bench.inputs", "--text", "@pydoc", "--tokenizer", folder, "-o", tmp_path / "x.npz")
    assert_one_line_exit_2(result, needle)
    assert not (tmp_path / "x.npz").exists()


def test_corrupt_tokenizer_export_genai_exits_2(nvidia, tmp_path):
    folder = copy_folder(nvidia, tmp_path / "bad")
    _truncate_tokenizer_json(folder)
    result = run_cli("exporters.export", folder, "-o", tmp_path / "genai", "--runtime", "genai", "--provider", "cpu")
    assert_one_line_exit_2(result, "tokenizer.json")
    assert not (tmp_path / "genai").exists()
