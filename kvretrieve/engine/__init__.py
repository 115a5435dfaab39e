"""The loop: forward passes as transactions (Ctrl-C safe), decode steps as CUDA graphs, sampling."""
