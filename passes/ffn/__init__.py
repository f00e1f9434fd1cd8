"""The FFN fusion: find -> check with a reason -> rewrite. It reads and rewrites graphs; it never runs a model.

  match      find every pre-norm SwiGLU FFN block; every other SiLU becomes a Rejection naming the failed check
  linear     the kinds of linear layer read and written (MatMul, Gemm; one interface), and weight values
  chains     maximal runs of consecutive FFN blocks
  structure  a model's graph index, blocks, chains and rejections, found once; counts for the reports
  plan       groups: explicit, the paper's rule, or policies over measured numbers; check_groups says why not
  rewrite    one wide FFN per group, exact to the parallel form
"""
