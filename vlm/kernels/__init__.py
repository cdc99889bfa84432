"""Memory-lean loss kernels (a tiled contrastive loss, a fused linear cross-entropy): import from the submodules."""
