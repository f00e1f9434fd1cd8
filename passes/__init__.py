"""The FFN-fusion compiler: passes over exported ONNX models.

Commands (python -m passes.X: they parse arguments, call the pipeline and print; nothing else):
  fuse             match -> chains -> (measure) -> plan -> rewrite -> verify -> write, and measure the change
  analyze          per-block metrics, the dependency matrix M and predicted costs, heatmaps
  drop_attention   the Puzzle step: rank and remove attention sublayers

passes.pipeline    the whole FFN fusion in one call: Plan (explicit groups, the paper's rule, auto), choose_groups,
                   fuse_model, stage_fused, fuse_file; used by the fuse CLI and by Python callers

Floors (imports only point down; a test checks it):
  passes.ffn        the FFN fusion, find -> check with a reason -> rewrite: match, linear (the kinds of linear
                    layer read and written), chains, structure, plan (explicit, paper, policies over measured
                    numbers), rewrite. Reads and rewrites graphs; never runs a model.
  passes.attention  the attention side: stream (sublayers on the residual stream), drop. Never runs a model.
  passes.measure    everything that runs a model: runs (suffix runs and their cost), metrics (cosdist, |h|/|x|,
                    M), predict (predicted cost of each candidate group), change (KL, top-1, perplexity; which
                    output is the logits), ranking (attention removal), plots. Imports ffn and attention types.
  passes.support    the ground floor, importing nothing above it: graph (the one graph index), patterns and norms
                    (sub-patterns and the one normalization recognizer, both directions), onnx_io (safe external
                    data, staged writing), outputs (output checks, staging), calibration and input files, genai
                    folders, builder (new nodes), ranges, report, errors.

passes/ imports no torch: it runs where only onnx and onnxruntime are installed.
"""
