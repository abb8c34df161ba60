"""Planning: beam search, Trifle's circuit-corrected proposals and multi-step values, baselines."""
