"""Layer 4, parallel: the exact token gather across the ranks that hold a batch's tokens (an
autograd all-gather with a commented backward) and per-token group ids sharded like the tokens."""
