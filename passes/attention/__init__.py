"""The attention side (the Puzzle step that makes FFN runs): find and remove sublayers. Never runs a model.

  stream     every sublayer x' = x + f(n(x)) on the residual stream, its kind and layer number
  drop       remove sublayers exactly (x' = x), KV caches and onnxruntime-genai folders included
"""
