#!/usr/bin/env bash
# vLLM 0.24.0 for a GPU machine that has torch 2.11 / CUDA 13 (the H200 image) but no network: one xz tarball of a
# site folder to put first on PYTHONPATH there, holding exactly what `vllm.LLM` imports at start-up and the image
# lacks (read off the image's package list in the device library's KINDS.md):
#
#   bash bench/vllm_site.sh [OUT.tar.xz]      (default .devwheels/vllm_site.tar.xz; about 210 MB)
#   on the GPU machine:  tar xJf vllm_site.tar.xz -C /tmp && export PYTHONPATH=/tmp/vllm_site:$PYTHONPATH
#
# What and why:
#  - vllm 0.24.0 (--no-deps: its torch 2.11.0, torchvision, triton, transformers, numpy are the image's), without
#    vllm_flash_attn/_vllm_fa2_C.abi3.so (FlashAttention 2, 182 MB, imported inside try: Hopper runs FA3 and fp32
#    runs Triton attention);
#  - module-level imports of vllm.LLM's path: pydantic (+ pydantic-core, annotated-types, typing-inspection),
#    msgspec, pyzmq, cachetools, cbor2, blake3, pybase64, setproctitle, partial-json-parser, ijson, depyf,
#    python-json-logger, fastapi + starlette, openai (+ httpx2, httpcore2, truststore, jiter, distro, sniffio,
#    idna >= 3.18), openai-harmony, anthropic (+ docstring-parser), mistral_common, compressed-tensors,
#    prometheus-fastapi-instrumentator, watchfiles, orjson, jsonschema (+ referencing, rpds-py,
#    jsonschema-specifications), lm-format-enforcer (+ interegular), outlines_core, lark, diskcache, llguidance;
#  - xgrammar 0.2.5.post1, the newest that works with vLLM's pinned apache-tvm-ffi 0.1.9 (0.2.6+ need >= 0.1.10).
# Not carried (imported only on paths these benchmarks do not take): flashinfer, tilelang, quack-kernels,
# nvidia-cutlass-dsl, fastsafetensors, humming-kernels, tokenspeed-mla, opentelemetry, mcp, numba 0.65 (the image's
# numba is used; bench.serving sets VLLM_USE_FLASHINFER_SAMPLER=0, else the sampler imports flashinfer). Versions
# are pinned below: the set was checked by importing vllm and building its ModelConfig for a folder of ours with
# nothing else on the path.
set -euo pipefail
out=${1:-.devwheels/vllm_site.tar.xz}
mkdir -p "$(dirname "$out")"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
get() { python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 \
          --platform any -d "$tmp/wheels" "$@"; }
get vllm==0.24.0
get pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 msgspec==0.23.0 \
    pyzmq==27.3.0 cachetools==8.0.2 cbor2==6.3.0 blake3==1.0.11 pybase64==1.5.1 setproctitle==1.3.8 \
    partial-json-parser==0.2.1.1.post7 ijson==3.6.0 depyf==0.20.0 python-json-logger==4.2.0 fastapi==0.136.3 \
    starlette==1.10.0 openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 \
    distro==1.9.0 sniffio==1.3.1 idna==3.20 openai-harmony==0.0.8 anthropic==2.16.0 docstring-parser==0.18.0 \
    mistral-common==1.13.1 compressed-tensors==0.17.0 prometheus-fastapi-instrumentator==8.1.0 watchfiles==1.3.0 \
    orjson==3.13.0 jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1 \
    lm-format-enforcer==0.11.3 interegular==0.3.3 outlines-core==0.2.14 lark==1.2.2 diskcache==5.6.3 \
    llguidance==1.6.1 xgrammar==0.2.5.post1 apache-tvm-ffi==0.1.9
site="$tmp/vllm_site"; mkdir -p "$site"
for wheel in "$tmp"/wheels/*.whl; do python -m zipfile -e "$wheel" "$site"; done   # a wheel is a zip of its files
rm -f "$site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
tar cf - -C "$tmp" vllm_site | xz -T0 -6 > "$out.tmp" && mv "$out.tmp" "$out"
echo "$out: $(du -h "$out" | cut -f1) ($(ls "$tmp"/wheels | wc -l) wheels)"
