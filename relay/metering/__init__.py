"""Token counting, pricing and usage accounting: pure, no I/O."""
