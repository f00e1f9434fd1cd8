"""The FFN-fusion compiler: passes over exported ONNX models.

Commands (python -m passes.X: they parse arguments, call the pipeline and print; nothing else):
  fuse             match -> chains -> (analysis) -> plan -> rewrite -> verify -> write, and measure the change
  analyze          per-block metrics and the dependency matrix M, heatmaps
  drop_attention   the Puzzle step: rank and remove attention sublayers

passes.pipeline, the stages, each a function over plain dataclasses:
  structure        one entry: graph index, FFN blocks, chains, rejections of a loaded model
  match, patterns  stage 1: pre-norm SwiGLU FFN blocks (patterns: weights, linear layers, normalizations)
  stream           the residual stream's sublayers (attention and others), layer numbers
  chains           stage 2: maximal runs of consecutive FFN blocks
  analysis, suffix stage 3: cosdist, |h|/|x|, M, measured by running only the parts of the graph that change
  plan, plan_auto  stage 4: explicit groups, the paper's rule, the measured plan
  rewrite, fusion  stage 5: one wide FFN per group; fusing a loaded model
  drop, ranking    removing sublayers; what removing each one alone costs
  change           model-level change: relative error, next-token KL, top-1, perplexity

passes.support, what the stages stand on: graph (the one graph index), onnx_io (loading with safe external data,
staged writing), calibration and input_files (inputs), genai (onnxruntime-genai folders), outputs (output checks,
staging), builder (new nodes), ranges, report, plots, errors.

passes/ imports no torch: it runs where only onnx and onnxruntime are installed.
"""
