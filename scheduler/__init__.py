"""What runs when and on how many SMs: requests, the paged-KV block manager, the batcher, the latency model and the
partition optimizer. Imports nothing from minidu.models or minidu.kernels, so it runs unchanged under the simulated executor."""
