"""Latency/throughput benchmark suite (``bgevl-bench``).

* ``suite``: workloads and backends (PyTorch eager, ONNX Runtime per precision, TensorRT where
  present, ``bgevl.runtime`` and Triton end to end);
* ``measure``: interleaved timing, memory sampling, the machine's matmul peak;
* ``report``: JSON, Markdown and PNG reports;
* ``cli``: the command line.
"""
