"""Measurement: everything that runs a model through onnxruntime, and the numbers made from it.

  runs       a base run, then runs of only the part of the graph downstream of each change (SuffixRuns), and
             what they cost (Cost)
  segments   the graph cut at residual nodes into segments of about one sublayer
  streams    segment-major runs: every variant of the base run pushed through each segment before the next
             (StreamRuns), so the weights are read once
  reductions per-token distances, norms and next-token KL computed where the values are (on the GPU)
  metrics    cosdist_io, |h|/|x| and the paper's dependency matrix M (the analysis between chains and plan)
  predict    the predicted cost of fusing each candidate group (fused-pair sensitivity x error energy)
  change     model-level change: relative error, next-token KL, top-1, perplexity; which output is the logits
  ranking    what removing each attention sublayer alone costs
  plots      dependency heatmaps, per-block and ranking plots
"""
