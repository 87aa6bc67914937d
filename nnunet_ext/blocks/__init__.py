"""Small dimension-agnostic building blocks shared by the networks."""
